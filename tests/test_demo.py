"""The app's service (`hones_core.demo`) in process, on the shipped toy VLM."""

from __future__ import annotations

import json
import math
import zlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from hones_core import rankings
from hones_core.demo import (DemoConfigError, DemoInputError, DemoService, diff_words, open_image, read_examples,
                             write_results)
from hones_core.interventions import Plan
from hones_core.tasks import TASKS
from hones_core.toy.examples import write_examples

from conftest import ASSETS, InsideCalls


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    write_examples(out, seed=4242, per_task=2)
    return read_examples(out)


def _request(service, example, **overrides):
    fields = dict(task=example["task"], image=example["image"], question=example.get("question"),
                  bbox=example.get("bbox"), candidates=example.get("candidates"), gold=example.get("answer"),
                  factor=0.0, budget_pct=2.0, method="hones")
    fields.update(overrides)
    return service.request(**fields)


def test_examples_file_round_trips(tmp_path):
    entries = write_examples(tmp_path, seed=7, per_task=2)
    assert [e["task"] for e in entries] == ["vqa"] * 2 + ["ocr"] * 2 + ["caption"] * 2 + ["retrieval"] * 2
    assert json.loads((tmp_path / "examples.json").read_text()) == entries
    assert len({e["image"] for e in entries}) == len(entries)      # every example its own scene
    read = read_examples(tmp_path)
    for entry in read["retrieval"]:
        assert entry["answer"] in entry["candidates"] and len(entry["candidates"]) == 5
    assert all(len(read[t]) == 2 for t in TASKS)
    assert write_examples(tmp_path / "again", seed=7, per_task=2) == entries     # deterministic


def test_bundled_examples_are_readable():
    read = read_examples(ASSETS / "examples")
    assert all(read[t] for t in TASKS)


def test_base_and_steered_rows_match_separate_generates(demo_service, examples):
    """One batched generate (row 0 plain, row 1 steered) gives what two separate runs give."""
    vlm = demo_service.vlm
    for example in examples["vqa"] + examples["ocr"] + examples["caption"]:
        request = _request(demo_service, example, gold=None)
        computed = demo_service.compute(request)
        plain = vlm.generate([request.image], [request.prompts[0]], max_new_tokens=24)[0]
        steered = vlm.generate([request.image], [request.prompts[0]], max_new_tokens=24,
                               plans=demo_service.plan(request))[0]
        from hones_core.tasks import clean_answer
        assert computed.base.answers == [clean_answer(plain, request.task)]
        assert computed.steered.answers == [clean_answer(steered, request.task)]
        assert not computed.base_cached


def test_slider_only_change_runs_only_the_steered_row_from_cache(demo_service, examples):
    example = examples["ocr"][0]
    first = demo_service.run(_request(demo_service, example, factor=0.0))
    calls = []
    original = demo_service.compute

    def spy(request, base=None):
        calls.append(base is not None)
        return original(request, base)

    again = demo_service.run(_request(demo_service, example, factor=2.5), compute=spy)
    assert calls == [True] and again.results["base_cached"]
    assert again.results["base"] == first.results["base"]
    # the cached base-plus-new-steered equals a fresh computation of the same request
    fresh = demo_service.compute(_request(demo_service, example, factor=2.5))
    assert again.results["steered"]["answer"] == fresh.steered.answers[0]


def _count_processor_runs(vlm, monkeypatch) -> list[int]:
    """A list that gets the row count of every processor call of `vlm`."""
    processed: list[int] = []
    original = vlm._process

    def counting(texts, images):
        processed.append(len(texts))
        return original(texts, images)
    monkeypatch.setattr(vlm, "_process", counting)
    return processed


def test_slider_moves_reuse_the_processed_inputs(toy_vlm, app_rankings, examples, monkeypatch):
    """The processor runs once per (image, prompts); moving the slider re-uses its outputs."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    processed = _count_processor_runs(toy_vlm, monkeypatch)
    for task in ("vqa", "retrieval"):
        example = examples[task][0]
        processed.clear()
        first = service.compute(_request(service, example, factor=0.0, gold=None))
        assert len(processed) == 1
        moved = [service.compute(_request(service, example, factor=f, gold=None), first.base) for f in (2.5, 0.5, 2.5)]
        assert len(processed) == 1, f"{task}: the slider moves ran the processor again"
        # the same slider move on a service with no processed inputs cached gives the same numbers
        # (one row each: a batch of two rows may take other BLAS kernels)
        fresh = DemoService(toy_vlm, service.artifact).compute(_request(service, example, factor=2.5, gold=None),
                                                               first.base)
        assert len(processed) == 2
        assert moved[0].steered.answers == moved[2].steered.answers == fresh.steered.answers
        assert moved[0].steered.margins == moved[2].steered.margins == fresh.steered.margins
        np.testing.assert_array_equal(moved[0].steered.contributions, fresh.steered.contributions)
        # another question is another input: processed anew
        if task == "vqa":
            service.compute(_request(service, example, question="How many shapes are there?", gold=None))
            assert len(processed) == 3


def test_factor_one_is_the_identity_and_zero_masks(demo_service, examples):
    changed = 0
    for task in TASKS:
        for example in examples[task]:
            same = demo_service.compute(_request(demo_service, example, factor=1.0))
            assert same.steered.answers == same.base.answers
            assert same.steered.margins == same.base.margins
            np.testing.assert_array_equal(same.steered.contributions, same.base.contributions)
            masked = demo_service.compute(_request(demo_service, example, factor=0.0))
            selection = demo_service.selection(task, "hones", 2.0)
            for layer, neurons in selection.items():     # masked neurons contribute exactly nothing
                assert np.all(masked.steered.contributions[layer, neurons] == 0)
            changed += masked.steered.answers != masked.base.answers or masked.steered.margins != masked.base.margins
    assert changed >= 1


def test_retrieval_margins_match_next_token_logits(demo_service, examples):
    example = examples["retrieval"][0]
    request = _request(demo_service, example, factor=0.0)
    computed = demo_service.compute(request)
    yes, no = demo_service.vlm.yes_no_ids()
    images = [request.image] * len(request.prompts)
    base = demo_service.vlm.next_token_logits(images, list(request.prompts))
    steered = demo_service.vlm.next_token_logits(images, list(request.prompts), plans=demo_service.plan(request))
    assert computed.base.margins == pytest.approx((base[:, yes] - base[:, no]).tolist(), abs=1e-5)
    assert computed.steered.margins == pytest.approx((steered[:, yes] - steered[:, no]).tolist(), abs=1e-5)
    out = demo_service.run(request)
    ranks = [row[0] for row in out.table]
    assert ranks == sorted(ranks) == list(range(1, len(request.candidates) + 1))
    assert [row[3] for row in out.table] == sorted([row[3] for row in out.table], reverse=True)
    assert "NDCG@5" in out.summary


def test_outputs_plots_results_and_metric(demo_service, examples, tmp_path):
    example = examples["vqa"][0]
    out = demo_service.run(_request(demo_service, example, factor=0.0))
    assert set(out.plots) == {"heads", "layers", "contributions", "layer_sums", "overlap"}
    for image, caption in out.plots.values():
        assert image.size[0] > 100 and caption and "\n" not in caption
    assert "VQA accuracy" in out.summary and "log-prob" in out.summary
    results = json.loads(write_results(out.results, tmp_path).read_text())
    assert results["task"] == "vqa" and results["factor"] == 0.0 and results["gold"] == example["answer"]
    selected = {int(k): v for k, v in results["selected_neurons"].items()}
    assert selected == demo_service.selection("vqa", "hones", 2.0)
    # the gold log-probs are the teacher-forced ones of the two rows
    request = _request(demo_service, example, factor=0.0)
    vlm = demo_service.vlm
    lp = vlm.answer_logprobs([request.image] * 2, [request.prompts[0]] * 2, [example["answer"]] * 2,
                             plans=[Plan(), demo_service.plan(request)], reduction="mean")
    assert results["base"]["gold_logprob"] == pytest.approx(float(lp[0]), abs=1e-5)
    assert results["steered"]["gold_logprob"] == pytest.approx(float(lp[1]), abs=1e-5)


def test_sweep_values_are_the_logprobs_at_each_factor(demo_service, examples):
    example = examples["caption"][0]
    request = _request(demo_service, example, factor=0.5)
    image, caption, factors, values = demo_service.sweep(request)
    assert factors[0] == 0.0 and 1.0 in factors and caption
    vlm = demo_service.vlm
    expected = [float(vlm.answer_logprobs([request.image], [request.prompts[0]], [example["answer"]],
                                          plans=demo_service.plan(request, f), reduction="mean")[0])
                for f in (0.0, 1.0, 3.0)]
    got = [values[factors.index(f)] for f in (0.0, 1.0, 3.0)]
    assert got == pytest.approx(expected, abs=1e-4)


def test_neuron_sets(demo_service, examples, app_rankings, tmp_path):
    keys = [k for _, k in demo_service.methods("vqa")]
    assert keys[0] == "hones" and "random" in keys and "learned" in keys   # the bundled artifact has scales
    bare = rankings.load(app_rankings)
    bare.tasks["vqa"].scales = None
    assert "learned" not in [k for _, k in DemoService(demo_service.vlm, bare).methods("vqa")]
    hones, rand = demo_service.selection("vqa", "hones", 2.0), demo_service.selection("vqa", "random", 2.0)
    assert {l: len(v) for l, v in hones.items()} == {l: len(v) for l, v in rand.items()} and hones != rand
    # learned scales appear when the artifact has them, and scale z by (1 + s) * factor
    artifact = rankings.load(app_rankings)
    scales = rankings.Scales(layers=[0, 1], neurons=[3, 5], scale=[0.5, -1.0], meta={"method": "test"})
    artifact.tasks["vqa"].scales = scales
    service = DemoService(demo_service.vlm, artifact)
    assert "learned" in [k for _, k in service.methods("vqa")]
    request = _request(service, examples["vqa"][0], method="learned", factor=2.0)
    plan = service.plan(request)
    assert [(e.layer, e.neurons, e.factor) for e in plan.neurons] == [(0, (3,), (3.0,)), (1, (5,), (0.0,))]
    assert service.run(request).results["neuron_set"] == "learned"


@pytest.mark.parametrize("change, message", [
    (dict(task="nope"), "Unknown task"),
    (dict(question=""), "question is empty"),
    (dict(question="x" * 10_000), "10,000 characters"),
    (dict(factor=float("nan")), "finite number"),
    (dict(factor=3.5), "between 0 and 3"),
    (dict(factor=-0.1), "between 0 and 3"),
    (dict(factor="abc"), "must be a number"),
    (dict(budget_pct=0), "above 0"),
    (dict(budget_pct=100.5), "at most 100"),
    (dict(budget_pct=float("inf")), "finite"),
    (dict(method="magic"), "not available"),
    (dict(image=None), "No image"),
])
def test_bad_inputs_raise_clear_errors(demo_service, examples, change, message):
    with pytest.raises(DemoInputError, match=message):
        _request(demo_service, examples["vqa"][0], **change)


def test_retrieval_and_ocr_input_errors(demo_service, examples):
    retrieval, ocr = examples["retrieval"][0], examples["ocr"][0]
    with pytest.raises(DemoInputError, match="at least 2"):
        _request(demo_service, retrieval, candidates="only one caption", gold=None)
    with pytest.raises(DemoInputError, match="at least 2"):
        _request(demo_service, retrieval, candidates="same\nsame\n  \n", gold=None)
    with pytest.raises(DemoInputError, match="gold answer must be one of the candidates"):
        _request(demo_service, retrieval, gold="not a candidate")
    with pytest.raises(DemoInputError, match="four numbers"):
        _request(demo_service, ocr, bbox="1, 2, three, 4")
    with pytest.raises(DemoInputError, match="outside"):
        _request(demo_service, ocr, bbox="500, 500, 10, 10")
    drawn = _request(demo_service, ocr, bbox="10, 10, 30, 20").image
    assert drawn.getpixel((10, 15)) == (0, 0, 255)          # the app draws the blue box


def test_missing_task_is_refused_with_the_reason(toy_vlm, app_rankings, examples):
    artifact = rankings.load(app_rankings)
    del artifact.tasks["caption"]
    service = DemoService(toy_vlm, artifact)
    assert service.tasks == ["vqa", "ocr", "retrieval"] and "caption" in service.unavailable()
    with pytest.raises(DemoInputError, match="not available: the rankings .* have no caption task"):
        _request(service, examples["caption"][0])


def test_mismatched_rankings_refuse_to_load(app_rankings, tmp_path):
    """Rankings of a model with one more layer stop start-up with a message naming both sides."""
    from dataclasses import replace

    artifact = rankings.load(app_rankings)
    grown = {task: rankings.TaskRanking(task, torch.cat([r.head_scores, r.head_scores[:1]]),
                                        torch.cat([r.importance, r.importance[:1]]), r.top_heads)
             for task, r in artifact.tasks.items()}
    layers = artifact.model.num_layers
    other = rankings.Rankings(model=replace(artifact.model, num_layers=layers + 1, id="bigger-model"), tasks=grown)
    rankings.save(other, tmp_path / "other")
    with pytest.raises(DemoConfigError, match=f"made for {layers + 1} layers \\(bigger-model\\).*has {layers}"):
        DemoService.load(str(ASSETS / "toy-vlm"), str(tmp_path / "other"), device="cpu")
    with pytest.raises(DemoConfigError, match="HONES_RANKINGS=.*no rankings folder"):
        DemoService.load(str(ASSETS / "toy-vlm"), str(tmp_path / "nowhere" / "x" / "y"), device="cpu")


# ----- images ---------------------------------------------------------------------------------


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height, with a tiny (invalid) body: a decompression bomb's signature."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_image_checks(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGBA", (64, 48), (10, 20, 30, 0)).save(good)
    image, notes = open_image(str(good))
    assert image.mode == "RGB" and image.size == (64, 48) and notes == []
    assert image.getpixel((0, 0)) == (255, 255, 255)      # transparent -> white, not black
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DemoInputError, match="not an image"):
        open_image(str(text))
    truncated = tmp_path / "truncated.png"
    Image.effect_noise((200, 200), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(DemoInputError, match="damaged or truncated"):
        open_image(str(truncated))
    with pytest.raises(DemoInputError, match=r"more pixels than the app decodes safely \(at most 50 megapixels\)") \
            as bomb:
        open_image(str(_png_header_only(tmp_path / "bomb.png", 20000, 20000)))
    assert "DOS" not in str(bomb.value) and "decompression" not in str(bomb.value)   # our words, not PIL's
    with pytest.raises(DemoInputError, match="megapixels"):
        open_image(str(_png_header_only(tmp_path / "big.png", 9000, 9000)))
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(DemoInputError, match="only 1×1 px") as small:
        open_image(str(tiny))
    assert "damaged" not in str(small.value)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (2000, 20)).save(thin)
    with pytest.raises(DemoInputError, match="elongated"):
        open_image(str(thin))
    large = tmp_path / "large.png"
    Image.new("RGB", (3000, 1500), (1, 2, 3)).save(large)
    image, notes = open_image(str(large))
    assert image.size == (2048, 1024) and "downscaled" in notes[0]
    with pytest.raises(DemoInputError, match="No image"):
        open_image(None)


def test_diff_words_marks_only_the_differences():
    left, right = diff_words("a red circle", "a blue circle")
    assert left == [("a ", None), ("red ", "removed"), ("circle ", None)]
    assert right == [("a ", None), ("blue ", "added"), ("circle ", None)]
    same_left, same_right = diff_words("yes", "yes")
    assert same_left == same_right == [("yes ", None)]


def test_concurrent_requests_match_sequential(demo_service, examples):
    """16 requests with different tasks and factors in threads give their sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(examples[t][i % 2], f) for i, (t, f) in enumerate(
        (t, f) for t in TASKS for f in (0.0, 0.5, 2.0, 3.0))]
    assert len(cases) == 16
    requests = [_request(demo_service, e, factor=f) for e, f in cases]
    sequential = [demo_service.compute(r) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(demo_service.compute, requests))
    for s, p in zip(sequential, parallel):
        assert s.base.answers == p.base.answers and s.steered.answers == p.steered.answers
        assert s.base.margins == pytest.approx(p.base.margins, abs=1e-5)
        assert s.steered.margins == pytest.approx(p.steered.margins, abs=1e-5)
        assert math.isclose(float(np.abs(s.steered.contributions - p.steered.contributions).max()), 0, abs_tol=1e-5)


def test_rows_of_one_request_share_the_vision_tower(demo_service, examples):
    """compute (generation and retrieval), the gold log-prob and the sweep run the tower on one image only."""
    vlm = demo_service.vlm
    embeddings = next(m for name, m in vlm.arch.vision_tower.named_modules() if name.endswith("embeddings"))
    seen: list[int] = []
    handle = embeddings.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True)
    try:
        for task in ("vqa", "retrieval"):
            request = _request(demo_service, examples[task][0], factor=0.0)
            seen.clear()
            vlm.next_token_logits([request.image], [request.prompts[0]])
            one_image = list(seen)
            seen.clear()
            computed = demo_service.compute(request)
            rows = len(request.prompts) * 2
            # generation: generate + gold log-probs; retrieval: one forward pass over candidates x (base, steered)
            assert seen == one_image * (2 if task != "retrieval" and request.gold else 1), (task, rows, seen)
            seen.clear()
            demo_service.compute_sweep(request, computed.base)
            assert seen == one_image
    finally:
        handle.remove()


def test_gold_path_reuses_the_processed_inputs_on_slider_moves(toy_vlm, app_rankings, examples, monkeypatch):
    """With a gold answer, a slider move runs the processor neither for the answer nor for the gold log-prob."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    processed = _count_processor_runs(toy_vlm, monkeypatch)
    example = examples["vqa"][0]
    first = service.compute(_request(service, example, factor=0.0))
    assert example["answer"] and len(processed) == 2          # the prompt, and prompt + gold answer
    moved = [service.compute(_request(service, example, factor=f), first.base) for f in (2.5, 0.5)]
    assert len(processed) == 2, "a slider move ran the processor again"
    assert moved[0].steered.gold_logprob != moved[1].steered.gold_logprob   # the steered row really re-ran
    # independently: the teacher-forced mean log-prob of the gold answer under the factor-2.5 plan, one row
    request = _request(service, example, factor=2.5)
    expected = toy_vlm.answer_logprobs([request.image], [request.prompts[0]], [example["answer"]],
                                       plans=service.plan(request), reduction="mean")
    assert moved[0].steered.gold_logprob == pytest.approx(float(expected[0]), abs=1e-5)


def test_model_work_of_run_and_sweep_goes_through_the_given_functions(toy_vlm, app_rankings, examples):
    """What ZeroGPU needs: every model call of run and sweep happens inside the functions the caller passes."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    calls = InsideCalls()
    handle = calls.watch(toy_vlm)
    try:
        for task in ("caption", "vqa", "retrieval"):
            request = _request(service, examples[task][1], factor=0.5)
            # a sweep for an input never run before: the base answer is computed first
            service.sweep(request, compute=calls.wrap(service.compute), compute_sweep=calls.wrap(service.compute_sweep))
            service.run(_request(service, examples[task][1], factor=2.0), compute=calls.wrap(service.compute))
    finally:
        handle.remove()
    assert calls.inside > 0 and calls.outside == 0, vars(calls)


def test_contributions_are_z_times_the_readout_of_the_answer_direction(toy_vlm, app_rankings, examples):
    """c_{l,i} = z_{l,i} <W_down[:, i], u_y>, checked neuron by neuron with plain loops; the readout is cached."""
    from hones_core.interventions import intervene

    service = DemoService(toy_vlm, rankings.load(app_rankings))
    example = examples["vqa"][0]
    request = _request(service, example, factor=1.0)
    computed = service.compute(request)
    with torch.inference_mode(), intervene(toy_vlm.arch, Plan(), capture="last") as capture:
        toy_vlm.last_hidden(toy_vlm.encode([request.image], [request.prompts[0]]).inputs)
    ids = toy_vlm.answer_token_ids(request.prompts[0], example["answer"])
    unembedding = toy_vlm.arch.unembedding().detach().double()
    u = sum(unembedding[t] for t in ids)
    u = u / u.norm()
    for layer in range(toy_vlm.arch.num_layers):
        down = toy_vlm.arch.layers[layer].down_proj.weight.detach().double()
        for neuron in (0, 7, toy_vlm.arch.intermediate_size - 1):
            z = float(capture.neurons[layer][0, neuron])
            expected = z * sum(float(down[k, neuron]) * float(u[k]) for k in range(down.shape[0]))
            assert computed.base.contributions[layer, neuron] == pytest.approx(expected, abs=1e-5)
    assert len(service.readout_cache.items) == 1
    service.compute(_request(service, example, factor=0.0), computed.base)
    assert len(service.readout_cache.items) == 1      # same target: the readout is not recomputed


def test_the_same_request_twice_computes_once(toy_vlm, app_rankings, examples, monkeypatch):
    """Typing a factor and clicking Run sends the request twice (blur, click): one computation."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    runs = []
    original = service.compute
    monkeypatch.setattr(service, "compute", lambda *a, **k: runs.append(1) or original(*a, **k))
    example = examples["vqa"][0]
    first = service.run(_request(service, example, factor=0.5))
    again = service.run(_request(service, example, factor=0.5))
    assert len(runs) == 1 and again.summary == first.summary and "from the cache" not in first.summary
    service.run(_request(service, example, factor=0.75))
    assert len(runs) == 2
    # the two events of one action arrive together: the second waits for the first's output
    import threading
    import time

    def slow(*args, **kwargs):
        runs.append(1)
        time.sleep(0.3)
        return original(*args, **kwargs)
    monkeypatch.setattr(service, "compute", slow)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(service.run(_request(service, example, factor=1.5))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 3 and len(outs) == 3 and outs[0] is outs[1] is outs[2]


def test_summary_budget_and_results_provenance(demo_service, examples):
    from hones_core import __version__

    out = demo_service.run(_request(demo_service, examples["vqa"][0], budget_pct=100.0, factor=1.0))
    total = demo_service.vlm.arch.num_layers * demo_service.vlm.arch.intermediate_size
    assert f"{total:,} neurons (100 % of {total:,})" in out.summary and "e+" not in out.summary
    results = out.results
    assert results["model"] == {"id": str(ASSETS.joinpath("toy-vlm").resolve()), "revision": None, "commit": None}
    assert results["rankings"]["id"] == str(ASSETS.joinpath("rankings", "toy-vlm").resolve())
    assert results["rankings"]["revision"] is None and results["hones_core"] == __version__


@pytest.mark.parametrize("value, shown", [(100, "100"), (12.5, "12.5"), (1.0, "1"), (0.25, "0.25"),
                                          (0.0031, "0.0031"), (33.333, "33.3")])
def test_format_pct(value, shown):
    from hones_core.demo import format_pct

    assert format_pct(value) == shown


def test_devices_that_are_not_there_are_refused():
    from hones_core.demo import check_device

    check_device(None)
    check_device("cpu")
    with pytest.raises(DemoConfigError, match="is not a device name"):
        check_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(DemoConfigError, match="no CUDA device.*HONES_DEVICE=cpu"):
            check_device("cuda")
