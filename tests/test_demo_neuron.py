"""The neuron card (`hones_core.demo.neuron`): every number against an independent computation.

On the shipped toy VLM (Idefics3) with its bundled rankings and discovery statistics, and on
tiny random LLaVA and Qwen2-VL models with rankings made up for their shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hones_core.demo import neuron as N
from hones_core.demo.compute import BaseResult
from hones_core.demo.request import make_request
from hones_core.errors import DemoInputError
from hones_core.interventions import Plan
from hones_core.rankings import ModelInfo, NeuronStats, Rankings, TaskRanking
from hones_core.tasks import TASKS

from conftest import demo_request

TINY = ("llava", "qwen2-vl")
# Sums of a few float32 log-probs: a row of a batch of 3 vs the same row alone differs by float32
# rounding (~1e-6 here); 1e-4 leaves room and is far below the effects tested (> 1e-3).
LOGPROB_TOL = 1e-4


def made_up_rankings(vlm, *, stats: bool = True) -> Rankings:
    """Seeded rankings of every task for a tiny model's shapes ("dvp" baseline, stats if asked)."""
    arch = vlm.arch
    L, H, I = arch.num_layers, arch.num_heads, arch.intermediate_size
    g = torch.Generator().manual_seed(0)
    tasks = {}
    for task in TASKS:
        made = None
        if stats:
            made = NeuronStats(mean=torch.randn(L, I, generator=g), std=torch.rand(L, I, generator=g) + 0.1,
                               mean_abs=torch.rand(L, I, generator=g), positive=torch.rand(L, I, generator=g), items=9)
        tasks[task] = TaskRanking(task=task, head_scores=torch.randn(L, H, generator=g),
                                  importance=torch.rand(L, I, generator=g), top_heads=[(0, 0)],
                                  baselines={"dvp": torch.randn(L, I, generator=g)}, stats=made)
    return Rankings(model=ModelInfo.from_arch(arch, id=str(vlm.name), revision=None), tasks=tasks)


def tiny_case(vlm, images):
    """A VQA request on a tiny model, a made-up base answer and a steered plan masking 5 % of neurons."""
    artifact = made_up_rankings(vlm)
    request = make_request(task="vqa", image=images[0], question="What color is the circle?", factor=0.0,
                           budget_pct=5.0)
    base = BaseResult(["red circle"], [], {}, "", 0, None, None)
    plan = Plan.scale_neurons(artifact.task("vqa").select("hones", 0.05), 0.0)
    return artifact, request, base, plan


def toy_case(service, example):
    request = demo_request(service, example)
    return service.artifact, request, service.compute(request).base, service.plan(request)


def z_last_prompt(vlm, image, prompt, layer, neuron) -> float:
    """z of one neuron at the last prompt position of a prompt-only pass of one row (a plain hook)."""
    seen = {}

    def record(module, args):         # returns None: the input goes on unchanged
        seen.setdefault("z", float(args[0][0, -1, neuron]))
    hook = vlm.arch.layers[layer].down_proj.register_forward_pre_hook(record)
    try:
        with torch.inference_mode():
            vlm.last_hidden(vlm.encode([image], [prompt]).inputs, use_cache=False)
    finally:
        hook.remove()
    return seen["z"]


def check_card(vlm, artifact, request, base, plan, layer, neuron):
    card = N.neuron_card(vlm, request, artifact, base, plan, layer=layer, neuron=neuron)
    prompt, answer = N.teacher_forced(request, base)
    # masking alone, and the steered row, against separate unbatched runs
    alone = vlm.answer_logprobs([request.image], [prompt], [answer])
    masked = vlm.answer_logprobs([request.image], [prompt], [answer],
                                 plans=Plan.scale_neurons({layer: [neuron]}, 0.0))
    steered = vlm.answer_logprobs([request.image], [prompt], [answer], plans=plan)
    assert card.logprob["base"] == pytest.approx(float(alone[0]), abs=LOGPROB_TOL)
    assert card.logprob["masked"] == pytest.approx(float(masked[0]), abs=LOGPROB_TOL)
    assert card.logprob["steered"] == pytest.approx(float(steered[0]), abs=LOGPROB_TOL)
    assert card.delta == pytest.approx(float(masked[0] - alone[0]), abs=LOGPROB_TOL)
    assert card.answer_tokens == len(vlm.answer_token_ids(prompt, answer))
    assert card.delta_per_token == pytest.approx(card.delta / card.answer_tokens)
    # the activation: z at the last prompt position of the base row, vs a prompt-only pass alone
    z = z_last_prompt(vlm, request.image, prompt, layer, neuron)
    assert card.activation == pytest.approx(z, rel=1e-4, abs=1e-5)
    stats = artifact.task(request.task).stats
    assert card.stats == pytest.approx({k: float(getattr(stats, k)[layer, neuron])
                                        for k in ("mean", "std", "mean_abs", "positive")})
    assert card.z_score == pytest.approx((z - float(stats.mean[layer, neuron])) / float(stats.std[layer, neuron]),
                                         rel=1e-4, abs=1e-4)
    return card


def test_masking_and_activation_on_the_toy_vlm(demo_service, examples):
    artifact, request, base, plan = toy_case(demo_service, examples["caption"][0])
    layer, neuron, _ = artifact.task("caption").ranked("hones", 0.01)[0]
    card = check_card(demo_service.vlm, artifact, request, base, plan, layer, neuron)
    assert abs(card.delta) > 1e-3        # the top caption neuron matters for this caption: the test can fail
    text = N.card_markdown(card)
    assert f"Neuron L{layer}·n{neuron}" in text and "σ from its caption discovery mean" in text


@pytest.mark.parametrize("family", TINY)
def test_masking_and_activation_on_tiny_models(tiny_vlm, images, family):
    vlm = tiny_vlm(family)
    artifact, request, base, plan = tiny_case(vlm, images)
    card = check_card(vlm, artifact, request, base, plan, vlm.arch.num_layers - 1, 3)
    assert abs(card.delta) > 1e-6 and card.logprob["masked"] != card.logprob["base"]


def test_retrieval_is_scored_on_the_shown_candidate_answered_as_the_base_model_did(demo_service, examples):
    artifact, request, base, plan = toy_case(demo_service, examples["retrieval"][0])
    prompt, answer = N.teacher_forced(request, base)
    assert prompt == request.prompts[base.row]
    assert answer == ("Yes" if base.margins[base.row] > 0 else "No")
    layer, neuron, _ = artifact.task("retrieval").ranked("hones", 0.01)[0]
    card = check_card(demo_service.vlm, artifact, request, base, plan, layer, neuron)
    assert f"candidate {base.row + 1}" in N.card_markdown(card)


@pytest.mark.parametrize("family", ("toy", *TINY))
def test_promoted_and_suppressed_tokens_by_a_plain_loop(toy_vlm, tiny_vlm, family):
    vlm = toy_vlm if family == "toy" else tiny_vlm(family)
    W_U = vlm.arch.unembedding().detach().double().numpy()                   # [vocab, hidden]
    for layer, neuron in ((0, 0), (vlm.arch.num_layers - 1, vlm.arch.intermediate_size - 1)):
        column = vlm.arch.layers[layer].down_proj.weight.detach().double().numpy()[:, neuron]
        values = []
        for row in W_U:                                  # W_U[t] · W_down[:, i], token by token
            total = 0.0
            for a, b in zip(row, column):
                total += a * b
            values.append(total)
        up = sorted(range(len(values)), key=lambda t: (-values[t], t))[:10]
        down = sorted(range(len(values)), key=lambda t: (values[t], t))[:10]
        promoted, suppressed = N.vocab_extremes(vlm, layer, neuron)
        assert [t.token_id for t in promoted] == up and [t.token_id for t in suppressed] == down
        assert [t.value for t in promoted] == pytest.approx([values[t] for t in up], abs=1e-5)
        assert [t.value for t in suppressed] == pytest.approx([values[t] for t in down], abs=1e-5)
        assert [t.text for t in promoted] == [vlm.tokenizer.decode([t]) or f"<id {t}>" for t in up]


def test_ranks_by_sorting_by_hand_in_every_task_and_method(demo_service, examples):
    artifact, request, base, plan = toy_case(demo_service, examples["vqa"][0])
    layer, neuron, _ = artifact.task("ocr").ranked("hones", 0.01)[1]
    card = N.neuron_card(demo_service.vlm, request, artifact, base, plan, layer=layer, neuron=neuron)
    I = demo_service.vlm.arch.intermediate_size
    index = layer * I + neuron
    assert set(card.ranks) == set(artifact.tasks)
    for task, ranking in artifact.tasks.items():
        assert set(card.ranks[task]) == set(ranking.methods()) - {"random"}
        for method, rank in card.ranks[task].items():
            scores = ranking.matrix(method).flatten().tolist()
            order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
            assert rank == order.index(index) + 1, (task, method)
            chosen = ranking.select(method, request.budget_pct / 100)
            assert card.selected[task][method] == (neuron in chosen.get(layer, [])), (task, method)
    assert card.ranks["ocr"]["hones"] == 2 and card.selected["ocr"]["hones"]
    scales = artifact.task("ocr").scales
    hit = ((scales.layers == layer) & (scales.neurons == neuron)).nonzero()
    assert ("ocr" in card.learned_scale) == bool(len(hit))
    text = N.card_markdown(card)
    assert "| ocr |" in text and "**2**" in text


def test_a_card_without_stats_says_how_to_add_them(tiny_vlm, images):
    vlm = tiny_vlm("llava")
    _, request, base, plan = tiny_case(vlm, images)
    artifact = made_up_rankings(vlm, stats=False)
    card = N.neuron_card(vlm, request, artifact, base, plan, layer=0, neuron=1)
    assert card.stats is None and card.z_score is None and card.stats_items == 0 and card.stats_by_task == {}
    text = N.card_markdown(card)
    assert "no discovery statistics" in text and "python -m hones_core stats --model" in text
    assert N.card_dict(card)["z_score"] is None


def test_bad_neurons_and_empty_answers_are_refused_with_a_message(tiny_vlm, images):
    vlm = tiny_vlm("llava")
    artifact, request, base, plan = tiny_case(vlm, images)
    L, I = vlm.arch.num_layers, vlm.arch.intermediate_size
    for layer, neuron, message in ((L, 0, f"has {L} layers"), (0, I, f"{I} FFN neurons"), (-1, 0, "does not exist"),
                                   (0.5, 0, "whole numbers"), ("x", 0, "whole numbers"), (True, 0, "whole numbers")):
        with pytest.raises(DemoInputError, match=message):
            N.neuron_card(vlm, request, artifact, base, plan, layer=layer, neuron=neuron)
    assert N.check_neuron(vlm, 1.0, "3") == (1, 3)
    with pytest.raises(DemoInputError, match="base answer is empty"):
        N.neuron_card(vlm, request, artifact, BaseResult([""], [], {}, "", 0, None, None), plan, layer=0, neuron=0)
    assert N.neurons_of("L3·n120") == (3, 120) and N.neurons_of("2, 17") == (2, 17)
    with pytest.raises(DemoInputError, match="layer and index"):
        N.neurons_of("L3")


def test_card_markdown_shows_tokens_safely():
    card = N.NeuronCard(layer=1, neuron=2, task="vqa", total=10, budget_pct=1.0,
                        promoted=[N.TokenValue(5, "a|b\n", 0.5)], suppressed=[N.TokenValue(6, "`x`", -0.25)],
                        activation=1.5, stats={"mean": 0.5, "std": 0.5, "mean_abs": 1.0, "positive": 0.25},
                        stats_items=4, stats_by_task={"vqa": 0.5, "ocr": -1.0}, stats_note="",
                        ranks={"vqa": {"hones": 1}}, selected={"vqa": {"hones": True}}, learned_scale={},
                        answer="red", answer_tokens=1, logprob={"base": -0.1, "steered": -0.2, "masked": -0.3},
                        delta=-0.2, delta_per_token=-0.2)
    assert card.z_score == pytest.approx(2.0)
    text = N.card_markdown(card)
    assert r"`a\|b\n`" in text and "`ˋxˋ`" in text           # no cell broken by a pipe, newline or backtick
    assert "+2.00 σ from its vqa discovery mean 0.5" in text and "ocr -1" in text
    assert "z > 0 on 25 % of 4 items" in text
    assert "Δ **-0.2**" in text and "| hones | **1** |" in text and "| learned scale s | — |" in text
    assert np.isclose(N.card_dict(card)["promoted"][0]["value"], 0.5)


def test_card_figure_draws_the_promoted_and_suppressed_values(toy_vlm):
    promoted, suppressed = N.vocab_extremes(toy_vlm, 2, 7)
    card = N.NeuronCard(layer=2, neuron=7, task="vqa", total=1, budget_pct=1.0, promoted=promoted,
                        suppressed=suppressed, activation=0.0, stats=None, stats_items=0, stats_by_task={},
                        stats_note="", ranks={}, selected={}, learned_scale={}, answer="a", answer_tokens=1,
                        logprob={"base": 0.0, "steered": 0.0, "masked": 0.0}, delta=0.0, delta_per_token=0.0)
    plot = N.card_figure(card)
    left, right = plot.figure.axes
    assert [p.get_width() for p in left.patches] == pytest.approx([t.value for t in promoted])
    assert [p.get_width() for p in right.patches] == pytest.approx([t.value for t in suppressed])
    assert [label.get_text() for label in left.get_yticklabels()] == [repr(t.text)[1:-1] or "∅" for t in promoted]
    assert "L2·n7" in left.get_title() and "L2·n7" in plot.caption
