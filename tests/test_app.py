"""The Gradio app end to end: launched on the toy VLM, driven through `gradio_client`."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from PIL import Image

from conftest import ASSETS

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
    args = app.parse_args(["--port", "8000"])
    assert (args.model, args.rankings, args.revision, args.rankings_revision, args.port) == \
        ("org/model", "org/rankings", "v1", "abc123", 8000)
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_start_up_refuses_a_missing_hub_repo(monkeypatch, capsys):
    import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--rankings", "nobody/no-such-rankings-repo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and "nobody/no-such-rankings-repo" in err and "Traceback" not in err


def test_factor_zero_changes_an_answer_and_one_changes_none(client):
    examples = [e for rows in _examples().values() for e in rows]
    changed = 0
    for example in examples:
        masked = client.predict(*_args(example, factor=0.0), api_name="/run")
        same = client.predict(*_args(example, factor=1.0), api_name="/run")
        base, steered = _answers(same)
        assert base == steered, example
        results = json.loads(open(same[-1]).read()) if isinstance(same[-1], str) else None
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


def test_concurrent_requests_match_sequential(launched):
    """16 concurrent requests (4 tasks x 4 factors) return what each returns alone."""
    client = Client(launched.local_url, verbose=False, download_files=False)   # answers only, no plot downloads
    examples = _examples()
    cases = [(examples[t][0], f) for t in examples for f in (0.0, 0.5, 2.0, 3.0)]
    assert len(cases) == 16
    sequential = [_answers(client.predict(*_args(e, factor=f, budget=3.0), api_name="/run")) for e, f in cases]
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


def test_nan_factor_through_the_raw_api_is_refused(launched):
    """JSON clients can send NaN (gradio_client cannot): the app answers with a clear error and keeps serving."""
    import httpx

    vqa = _examples()["vqa"][0]
    client = Client(launched.local_url, verbose=False)
    uploaded = client.predict(*_args(vqa, factor=1.0), api_name="/run")   # warms the route; returns fine
    assert uploaded
    upload = httpx.post(launched.local_url + "gradio_api/upload", files={"files": open(vqa["image"], "rb")}).json()
    image = {"path": upload[0], "meta": {"_type": "gradio.FileData"}}
    body = json.dumps({"data": ["vqa", image, vqa["question"], "", "", "", float("nan"), 2.0, "hones"],
                       "fn_index": _fn_index(launched, "run"), "session_hash": "nan-test"})
    join = httpx.post(launched.local_url + "gradio_api/queue/join", content=body,
                      headers={"Content-Type": "application/json"})
    if join.status_code == 200:
        with httpx.stream("GET", launched.local_url + "gradio_api/queue/data",
                          params={"session_hash": "nan-test"}, timeout=60) as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        done = [e for e in events if e.get("msg") == "process_completed"][-1]
        assert done["success"] is False and "finite number" in done["output"]["error"]
    else:
        assert join.status_code == 422   # refused as invalid JSON before reaching the app
    base, steered = _answers(client.predict(*_args(vqa, factor=1.0), api_name="/run"))
    assert base == steered


def _fn_index(blocks, api_name: str) -> int:
    for index, fn in blocks.fns.items():
        if fn.api_name == api_name:
            return index
    raise KeyError(api_name)
