"""The model work of a request (`hones_core.demo.compute`) on the shipped toy VLM: rows, caches, formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hones_core import rankings
from hones_core.demo import DemoService
from hones_core.interventions import Plan
from hones_core.tasks import TASKS

from conftest import demo_request as _request


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


def test_views_are_computed_only_when_opened(toy_vlm, app_rankings, examples):
    """A request never computes a view; an opened view reuses the cached base result."""
    service = DemoService(toy_vlm, rankings.load(app_rankings))
    computes = []
    original = service.compute

    def spy(request, base=None):
        computes.append(base is not None)
        return original(request, base)

    service.compute = spy
    example = examples["vqa"][0]
    service.run(_request(service, example, factor=0.0))
    assert computes == [False]                          # base and steered rows, nothing else
    picture, caption = service.head_view(_request(service, example, factor=0.0))
    assert picture.size[0] > 100 and "head" in caption and computes == [False]    # attention only: no answer rerun
    service.tokens_view(_request(service, example, factor=0.0))
    assert computes == [False, True]                    # the steered row again, the base from the cache
    # a view opened before any run computes the base once, and the run after it reuses it
    other = examples["vqa"][1]
    service.neuron_view(_request(service, other, factor=0.0), "L1·n3")
    assert computes == [False, True, False]
    assert service.run(_request(service, other, factor=0.0)).results["base_cached"]
