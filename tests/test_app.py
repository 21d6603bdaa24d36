"""The Gradio app end to end: launched on the toy VLM, driven through `gradio_client`."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import torch

from conftest import ASSETS, InsideCalls

ROOT = Path(__file__).resolve().parents[1]

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def launched(demo_service):
    import app

    blocks = app.build_app(demo_service, str(ASSETS / "examples"))
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, show_error=False,
                  max_file_size="25mb")
    yield blocks
    blocks.close()


@pytest.fixture(scope="module")
def client(launched):
    return Client(launched.local_url, verbose=False)


def _examples():
    from hones_core.demo import read_examples

    return read_examples(ASSETS / "examples")


def _args(example, *, factor, budget=2.0, method="hones", image=None):
    bbox = ", ".join(str(v) for v in example.get("bbox", []))
    return (example["task"], image if image is not None else handle_file(example["image"]),
            example.get("question", ""), bbox, "\n".join(example.get("candidates", [])), example.get("answer", ""),
            factor, budget, method)


def _answers(result):
    """(base, steered) answer text from the HighlightedText outputs."""
    def text(value):
        return "".join(part["token"] for part in value).strip()
    return text(result[0]), text(result[1])


def test_help_and_configuration(monkeypatch):
    import app

    monkeypatch.setenv("HONES_MODEL", "org/model")
    monkeypatch.setenv("HONES_RANKINGS", "org/rankings")
    monkeypatch.setenv("HONES_REVISION", "v1")
    monkeypatch.setenv("HONES_RANKINGS_REVISION", "abc123")
    monkeypatch.setenv("HONES_PORT", "9000")
    args = app.parse_args(["--port", "8000"])
    assert (args.model, args.rankings, args.revision, args.rankings_revision, args.port, args.concurrency) == \
        ("org/model", "org/rankings", "v1", "abc123", 8000, 4)
    assert app.parse_args([]).port == 9000
    assert app.parse_args([]).allow_other_model is False and app.parse_args(["--allow-other-model"]).allow_other_model
    monkeypatch.setenv("HONES_ALLOW_OTHER_MODEL", "1")
    assert app.parse_args([]).allow_other_model is True
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_help_is_answered_before_torch_and_gradio_load():
    """`python app.py --help` parses arguments first: neither torch nor gradio is imported, every default shown."""
    code = ("import sys, contextlib, io\nimport app\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n    app.parse_args(['--help'])\n"
            "print(sorted(m for m in ('torch', 'gradio', 'transformers') if m in sys.modules))\nprint(out.getvalue())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HONES_", "GRADIO_SERVER"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    loaded, _, help_text = done.stdout.partition("\n")
    assert loaded == "[]"
    for default in ("127.0.0.1", "7860", "(default: 4)", "toy-vlm", "examples"):
        assert default in help_text, default


def _start(capsys, argv):
    import app

    with pytest.raises(SystemExit) as exit_info:
        app.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


def test_start_up_refuses_a_missing_hub_repo_naming_both_sides(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _start(capsys, ["--rankings", "nobody/no-such-rankings-repo", "--port", str(_free_port())])
    assert "cannot start" in err and "nobody/no-such-rankings-repo" in err and "toy-vlm" in err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_start_up_refuses_a_busy_port_before_loading_anything(capsys, monkeypatch):
    import app

    monkeypatch.setattr(app, "load_service", lambda args: pytest.fail("the model loaded before the port check"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        err = _start(capsys, ["--port", str(port)])
    assert f"port {port}" in err and "--port" in err and "HONES_PORT" in err


@pytest.mark.parametrize("variable, value, message", [
    ("HONES_PORT", "abc", r"HONES_PORT='abc': 'abc' is not a port number"),
    ("HONES_PORT", "70000", "70000 is not a port number"),
    ("HONES_CONCURRENCY", "0", "HONES_CONCURRENCY='0'"),
])
def test_start_up_refuses_bad_environment_values(capsys, monkeypatch, variable, value, message):
    import app

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args([])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, err) and "Traceback" not in err, err


def test_start_up_refuses_a_device_that_is_not_there(capsys, monkeypatch):
    import app

    monkeypatch.setattr(app, "load_service", lambda args: pytest.fail("the model loaded before the device check"))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _start(capsys, ["--device", "cuda", "--port", str(_free_port())])
    assert "HONES_DEVICE=cuda" in err and "no CUDA device" in err and "HONES_DEVICE=cpu" in err


def test_start_up_refuses_a_missing_or_malformed_examples_folder(capsys, monkeypatch, tmp_path):
    import app

    monkeypatch.setattr(app, "load_service", lambda args: pytest.fail("the model loaded before the examples check"))
    err = _start(capsys, ["--examples", str(tmp_path / "nowhere"), "--port", str(_free_port())])
    assert "nowhere does not exist" in err and "HONES_EXAMPLES" in err
    (tmp_path / "examples.json").write_text("[{")
    err = _start(capsys, ["--examples", str(tmp_path), "--port", str(_free_port())])
    assert "not valid JSON" in err and "HONES_EXAMPLES" in err


def test_factor_zero_changes_an_answer_and_one_changes_none(client):
    examples = [e for rows in _examples().values() for e in rows]
    changed = 0
    for example in examples:
        masked = client.predict(*_args(example, factor=0.0), api_name="/run")
        same = client.predict(*_args(example, factor=1.0), api_name="/run")
        base, steered = _answers(same)
        assert base == steered, example
        results = json.loads(open(same[14]).read()) if isinstance(same[14], str) else None
        if results is not None and example["task"] == "retrieval":
            assert results["base"]["margins"] == results["steered"]["margins"]
        changed += _answers(masked)[0] != _answers(masked)[1]
    assert changed >= 1


def test_outputs_plots_and_download(client):
    example = _examples()["vqa"][0]
    result = client.predict(*_args(example, factor=0.0), api_name="/run")
    base, steered = _answers(result)
    assert base and steered
    images, captions = result[4:9], result[9:14]
    assert all(isinstance(path, str) and Image.open(path).size[0] > 100 for path in images)
    assert all(caption and "\n" not in caption for caption in captions)
    results = json.loads(open(result[14]).read())
    assert results["task"] == "vqa" and results["base"]["answer"] == base and results["factor"] == 0.0
    sweep_image, sweep_caption, sweep_json = client.predict(*_args(example, factor=0.0), api_name="/sweep")
    assert Image.open(sweep_image).size[0] > 100 and "factor" in sweep_caption
    assert json.loads(open(sweep_json).read())["sweep"]["factors"][0] == 0.0


def test_retrieval_table(client):
    example = _examples()["retrieval"][0]
    result = client.predict(*_args(example, factor=0.0), api_name="/run")
    table = result[3]["value"]
    assert table["headers"][:2] == ["base rank", "steered rank"]
    assert sorted(row[2].removesuffix(" ✓") for row in table["data"]) == sorted(example["candidates"])


def test_concurrent_requests_match_sequential(launched, demo_service):
    """16 concurrent requests (4 tasks x 4 factors) return what each returns alone."""
    client = Client(launched.local_url, verbose=False, download_files=False)   # answers only, no plot downloads
    examples = _examples()
    cases = [(examples[t][0], f) for t in examples for f in (0.0, 0.5, 2.0, 3.0)]
    assert len(cases) == 16
    sequential = [_answers(client.predict(*_args(e, factor=f, budget=3.0), api_name="/run")) for e, f in cases]
    for cache in (demo_service.output_cache, demo_service.base_cache):   # the concurrent ones compute anew
        cache.items.clear()
    jobs = [client.submit(*_args(e, factor=f, budget=3.0), api_name="/run") for e, f in cases]
    concurrent = [_answers(job.result(timeout=120)) for job in jobs]
    assert concurrent == sequential


def _bomb_png(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_bad_inputs_get_clear_messages_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    vqa = _examples()["vqa"][0]
    retrieval = _examples()["retrieval"][0]
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    truncated = tmp_path / "truncated.png"
    Image.effect_noise((200, 200), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    bomb = _bomb_png(tmp_path / "bomb.png", 20000, 20000)
    cases = [
        (_args(vqa, factor=0.0, image=None)[:1] + (None,) + _args(vqa, factor=0.0)[2:], "No image"),
        (_args(vqa, factor=0.0, image=handle_file(str(text_file))), "not an image"),
        (_args(vqa, factor=0.0, image=handle_file(str(truncated))), "damaged or truncated"),
        (_args(vqa, factor=0.0, image=handle_file(str(bomb))), "too large|megapixels"),
        (_args(vqa, factor=0.0, image=handle_file(str(tiny))), "only 1×1 px"),
        (_args({**vqa, "question": ""}, factor=0.0), "question is empty"),
        (_args({**vqa, "question": "x" * 10_000}, factor=0.0), "10,000 characters"),
        (_args({**retrieval, "candidates": ["just one"], "answer": ""}, factor=0.0), "at least 2"),
        (_args(vqa, factor=7.0), "greater than maximum|between 0 and 3"),
        (_args(vqa, factor=-1.0), "less than minimum|between 0 and 3"),
        (_args(vqa, factor=0.0, budget=0), "above 0"),
        (_args(vqa, factor=0.0, budget=150), "at most 100"),
        (("nope",) + _args(vqa, factor=0.0)[1:], "Unknown task"),
        (_args(vqa, factor=0.0, method="magic"), "not in the list of choices|not available"),
    ]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/run")
    # still serving
    base, steered = _answers(client.predict(*_args(vqa, factor=1.0), api_name="/run"))
    assert base == steered


@pytest.mark.parametrize("factor, budget, message", [(float("nan"), 2.0, "scaling factor must be a finite number"),
                                                      ("abc", 2.0, "scaling factor must be a number, got 'abc'"),
                                                      (1.0, "lots", "neuron budget must be a number, got 'lots'")])
def test_raw_api_values_are_refused_in_words(launched, factor, budget, message):
    """JSON clients can send NaN or a string where a number belongs (gradio_client cannot): a clear error."""
    import httpx

    vqa = _examples()["vqa"][0]
    client = Client(launched.local_url, verbose=False)
    upload = httpx.post(launched.local_url + "gradio_api/upload", files={"files": open(vqa["image"], "rb")}).json()
    image = {"path": upload[0], "meta": {"_type": "gradio.FileData"}}
    session = f"raw-{abs(hash((str(factor), str(budget))))}"
    body = json.dumps({"data": ["vqa", image, vqa["question"], "", "", "", factor, budget, "hones"],
                       "fn_index": _fn_index(launched, "run"), "session_hash": session})
    join = httpx.post(launched.local_url + "gradio_api/queue/join", content=body,
                      headers={"Content-Type": "application/json"})
    if join.status_code == 200:
        with httpx.stream("GET", launched.local_url + "gradio_api/queue/data",
                          params={"session_hash": session}, timeout=60) as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        done = [e for e in events if e.get("msg") == "process_completed"][-1]
        assert done["success"] is False and message in done["output"]["error"], done
    else:
        assert join.status_code == 422   # refused as invalid JSON before reaching the app
    base, steered = _answers(client.predict(*_args(vqa, factor=1.0), api_name="/run"))
    assert base == steered


def test_a_rejected_input_logs_one_line_and_no_traceback(client, caplog, capfd):
    vqa = _examples()["vqa"][0]
    from gradio_client.exceptions import AppError

    caplog.set_level(logging.INFO, logger="hones.app")
    capfd.readouterr()
    bad = [_args({**vqa, "question": ""}, factor=0.0), _args(vqa, factor=0.0, budget=0),
           _args(vqa, factor=0.0, image=None)[:1] + (None,) + _args(vqa, factor=0.0)[2:]]
    for args in bad:
        with pytest.raises(AppError):
            client.predict(*args, api_name="/run")
    rejected = [r for r in caplog.records if r.name == "hones.app" and r.getMessage().startswith("rejected input")]
    assert len(rejected) == len(bad) and all("\n" not in r.getMessage() for r in rejected)
    assert "Traceback" not in capfd.readouterr().err


def test_every_event_is_named_and_every_output_labelled(launched):
    assert all(fn.api_name for fn in launched.fns.values()), [fn.fn for fn in launched.fns.values()
                                                               if not fn.api_name]
    info = Client(launched.local_url, verbose=False).view_api(return_format="dict", print_info=False)
    for name in ("/run", "/sweep"):
        labels = [r["label"] for r in info["named_endpoints"][name]["returns"]]
        assert labels and not any(re.fullmatch(r"value_\d+", label or "") for label in labels), labels
        params = [p["parameter_name"] for p in info["named_endpoints"][name]["parameters"]]
        assert not any(re.fullmatch(r"value_\d+", p) for p in params), params


def test_on_zerogpu_every_model_call_runs_inside_spaces_gpu(toy_vlm, app_rankings, monkeypatch):
    """A stand-in `spaces` module (the decorator shape of ZeroGPU's): no model call outside the wrapped functions."""
    import types

    import app
    from hones_core import rankings
    from hones_core.demo import DemoService

    calls, wrapped = InsideCalls(), []

    def gpu(duration=60):
        def decorate(fn):
            wrapped.append(fn.__name__)
            return calls.wrap(fn)
        return decorate

    monkeypatch.setattr(app, "spaces", types.SimpleNamespace(GPU=gpu))
    service = DemoService(toy_vlm, rankings.load(app_rankings))     # empty caches
    handle = calls.watch(toy_vlm)
    blocks = app.build_app(service, str(ASSETS / "examples"))
    blocks.queue(default_concurrency_limit=1)
    blocks.launch(server_name="127.0.0.1", prevent_thread_lock=True, show_error=False)
    try:
        client = Client(blocks.local_url, verbose=False, download_files=False)
        examples = _examples()
        client.predict(*_args(examples["caption"][0], factor=0.5), api_name="/sweep")   # a new input: sweep first
        client.predict(*_args(examples["vqa"][0], factor=0.0), api_name="/run")
        client.predict(*_args(examples["vqa"][0], factor=0.0), api_name="/sweep")
        client.predict(*_args(examples["retrieval"][0], factor=2.0), api_name="/run")
        fresh = _args(examples["ocr"][0], factor=0.0)          # views of a request never run before
        client.predict(*fresh, "", api_name="/heads_view")
        client.predict(*_args(examples["caption"][1], factor=0.0), "2, 5", api_name="/neuron_view")
        client.predict(*_args(examples["vqa"][1], factor=0.0), api_name="/tokens_view")
    finally:
        handle.remove()
        blocks.close()
    assert sorted(wrapped) == ["compute", "compute_sweep", "head_view", "neuron_view", "tokens_view"]
    assert calls.inside > 0 and calls.outside == 0, vars(calls)


def _fn_index(blocks, api_name: str) -> int:
    for index, fn in blocks.fns.items():
        if fn.api_name == api_name:
            return index
    raise KeyError(api_name)


def test_the_run_says_what_the_stored_evaluation_shows_and_share_gives_a_link(client):
    """/run's last output is the held-out evidence line; /share gives a query that names the example."""
    from urllib.parse import parse_qs, urlsplit

    example = _examples()["caption"][0]
    result = client.predict(*_args(example, factor=0.0, budget=1.0), api_name="/run")
    assert result[-1].startswith("**On ") and "held-out items" in result[-1] and "(HONES, 1 %)" in result[-1]
    link, note = client.predict(*_args(example, factor=0.5, budget=2.0, method="random"), "http://space.example/",
                                api_name="/share")
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc) == ("http", "space.example")
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {"task": "caption", "example": Path(example["image"]).stem, "gold": example["answer"],
                     "method": "random", "budget": "2", "factor": "0.5"}
    assert "same example" in note


def test_the_views_endpoints_heads_neuron_card_and_answer_tokens(client, demo_service):
    """Each view has its own endpoint; bad input is answered inside the view, not with an error."""
    example = _examples()["caption"][0]
    args = _args(example, factor=0.0, budget=1.0)
    layer, head = demo_service.artifact.task("caption").top_heads[0]
    picture, caption = client.predict(*args, "", api_name="/heads_view")      # "" = the task's best head
    assert Image.open(picture).size[0] > 200 and f"layer {layer} head {head}" in caption
    _, caption = client.predict(*args, "L1·H2", api_name="/heads_view")
    assert "layer 1 head 2" in caption
    card, _ = client.predict(*args, "2, 5", api_name="/neuron_view")
    assert card.startswith("### Neuron L2·n5") and "Masking" in card
    # no neuron given: the first neuron the top-contributions plot lists (HONES: the ranking's order)
    layer, neuron, _ = demo_service.artifact.task("caption").ranked("hones", 0.01)[0]
    card, shown = client.predict(*args, "", api_name="/neuron_view")
    assert shown["value"] == f"L{layer}·n{neuron}" and card.startswith(f"### Neuron L{layer}·n{neuron}")
    assert shown["choices"][0][0] == shown["value"]      # the dropdown offers the plot's list
    card, _ = client.predict(*args, "L99·n1", api_name="/neuron_view")
    assert card.startswith("_Not computed:") and "99" in card
    table = client.predict(*args, api_name="/tokens_view")
    assert "| # | base answer | log p base |" in table


def test_each_tabs_gallery_names_its_own_gold_column(demo_service):
    """The gold box is shared by the tabs; each examples table still names that task's gold column."""
    import app

    blocks = app.build_app(demo_service, str(ASSETS / "examples"))
    headers = {c.label: c.headers for c in blocks.blocks.values() if type(c).__name__ == "Dataset"}
    for task, title in (("vqa", "VQA"), ("caption", "Caption"), ("retrieval", "Retrieval")):
        assert headers[f"{title} examples"][-1] == app.GOLD_LABELS[task], headers
