"""Every answer token (`hones_core.demo.tokens`): the 4 log-probs per position against a step-by-step forward.

On the shipped toy VLM (a real request whose answers differ) and on tiny random LLaVA and
Qwen2-VL models (made-up answers of different lengths).
"""

from __future__ import annotations

import pytest
import torch

from hones_core.demo import tokens as T
from hones_core.demo.compute import BaseResult, SteeredResult
from hones_core.demo.request import make_request
from hones_core.interventions import Plan, intervene

from conftest import demo_request

TINY = ("llava", "qwen2-vl")
# a row of a padded batch of 4 vs one growing row run alone: float32 rounding (~1e-6 here)
LOGPROB_TOL = 1e-4


def step_by_step(vlm, image, prompt, ids, plan) -> list[float]:
    """log p(ids[t] | prompt, ids[:t]) from one full forward per token, prompt inputs grown by hand."""
    prompt_inputs = vlm.encode([image], [prompt]).inputs
    width = prompt_inputs["input_ids"].shape[1]
    out = []
    for t in range(len(ids)):
        inputs = {}
        for key, value in prompt_inputs.items():
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == width:    # one entry per token
                extra = (torch.tensor([ids[:t]], dtype=value.dtype) if key == "input_ids" else
                         torch.ones(1, t, dtype=value.dtype) if key == "attention_mask" else
                         torch.zeros(1, t, dtype=value.dtype))
                value = torch.cat([value, extra], dim=1)
            inputs[key] = value
        with torch.inference_mode(), intervene(vlm.arch, plan):
            logits = vlm.model(**inputs, use_cache=False).logits[0, -1].float()
        out.append(float(torch.log_softmax(logits, -1)[ids[t]]))
    return out


def check_tokens(vlm, request, base, steered, plan):
    tokens = T.answer_tokens(vlm, request, base, steered, plan)
    prompt, base_answer, steered_answer = T.shown_answers(request, base, steered)
    assert tokens.answers == {"base": base_answer, "steered": steered_answer}
    for name, text in tokens.answers.items():
        ids = vlm.answer_token_ids(prompt, text) + [vlm.stop_token_id]
        assert tokens.ids[name] == ids
        for row, row_plan in (("base", Plan()), ("steered", plan)):
            expected = step_by_step(vlm, request.image, prompt, ids, row_plan)
            assert tokens.logprobs[name][row] == pytest.approx(expected, abs=LOGPROB_TOL), (name, row)
    assert tokens.parts_at == T.first_difference(tokens.ids["base"], tokens.ids["steered"])
    rows = tokens.rows()
    assert len(rows) == max(map(len, tokens.ids.values()))
    for row in rows:
        t = row["position"]
        for name in ("base", "steered"):
            inside = t < len(tokens.ids[name])
            assert row[f"{name}_id"] == (tokens.ids[name][t] if inside else None)
            assert row[f"{name}_under_steered"] == (tokens.logprobs[name]["steered"][t] if inside else None)
    return tokens


def test_every_token_of_both_toy_answers_under_both_rows(demo_service, examples):
    found = None
    for example in examples["caption"] + examples["vqa"] + examples["ocr"]:
        request = demo_request(demo_service, example)
        computed = demo_service.compute(request)
        if computed.base.answers != computed.steered.answers:
            found = request, computed
            break
    assert found, "no example whose answers differ at x0 on 2 % of HONES neurons"
    request, computed = found
    plan = demo_service.plan(request)
    tokens = check_tokens(demo_service.vlm, request, computed.base, computed.steered, plan)
    assert tokens.parts_at is not None
    # the steered row prefers its own answer's token where they part, the base row the base one's
    t = tokens.parts_at
    if t < min(map(len, tokens.ids.values())):
        assert tokens.logprobs["steered"]["steered"][t] >= tokens.logprobs["base"]["steered"][t]
        assert tokens.logprobs["base"]["base"][t] >= tokens.logprobs["steered"]["base"][t]
    text = T.tokens_markdown(tokens)
    assert f"part at token {t}" in text and text.count("◀") == 2      # the sentence and the marked row


@pytest.mark.parametrize("family", TINY)
def test_every_token_on_tiny_models(tiny_vlm, images, family):
    vlm = tiny_vlm(family)
    request = make_request(task="vqa", image=images[1], question="What color is the circle?", factor=0.0)
    L, I = vlm.arch.num_layers, vlm.arch.intermediate_size
    plan = Plan.scale_neurons({layer: list(range(0, I, 3)) for layer in range(L)}, 0.0)
    base = BaseResult(["red circle"], [], {}, "", 0, None, None)
    steered = SteeredResult(["red green square two"], [], None, None)
    tokens = check_tokens(vlm, request, base, steered, plan)
    assert tokens.logprobs["base"]["base"] != tokens.logprobs["base"]["steered"]     # the plan changes them


def test_retrieval_shows_the_shown_candidates_yes_or_no(demo_service, examples):
    request = demo_request(demo_service, examples["retrieval"][0])
    computed = demo_service.compute(request)
    tokens = check_tokens(demo_service.vlm, request, computed.base, computed.steered, demo_service.plan(request))
    row = computed.base.row
    assert tokens.prompt == request.prompts[row]
    assert tokens.answers["base"] == ("Yes" if computed.base.margins[row] > 0 else "No")
    assert tokens.answers["steered"] == ("Yes" if computed.steered.margins[row] > 0 else "No")


def test_first_difference():
    assert T.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert T.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert T.first_difference([1, 2], [1, 2, 7]) == 2
    assert T.first_difference([4], [1]) == 0


def test_markdown_of_identical_answers():
    tokens = T.AnswerTokens({"base": "red", "steered": "red"}, {"base": [5, 2], "steered": [5, 2]},
                            {"base": ["red", "</s>"], "steered": ["red", "</s>"]},
                            {"base": {"base": [-0.5, -1e-5], "steered": [-0.25, 0.0]},
                             "steered": {"base": [-0.5, -1e-5], "steered": [-0.25, 0.0]}}, None, "p")
    text = T.tokens_markdown(tokens)
    assert "same tokens" in text and "◀" not in text
    assert "| 0 | `red` | -0.500 | -0.250 | `red` | -0.500 | -0.250 |  |" in text
    assert "-1.0e-05" in text                                   # not shown as -0.000
    assert T.tokens_dict(tokens)["rows"][1]["base_token"] == "</s>"
