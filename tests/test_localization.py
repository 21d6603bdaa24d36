import pytest
import torch

from hones_core import metrics
from hones_core.evaluation import predict, references
from hones_core.interventions import Plan
from hones_core.localization import (HeadScores, default_top_heads, score_heads, score_heads_reference,
                                     utilities)


def test_batched_head_scores_equal_the_one_head_one_item_loop(toy_vlm, toy_items):
    items = toy_items("vqa")[:6]
    # Batches of 16 rows and one-row runs go through GEMMs of other shapes, so other BLAS kernels: the
    # logprob utility (a mean of float32 log-probs of size ~0.5, from logits of size ~10) agrees to a few
    # 1e-6 (measured <= 2.5e-6 for the scores, <= 8e-7 for the base, with three MKL/ATen code paths and 1-2
    # threads), hence 2e-5 and 1e-5. The metric utility scores greedy answers, which agree exactly: the
    # smallest top-2 logit gap over these items and every head plan is 3.7e-2, far above any rounding.
    for utility in ("metric", "logprob"):
        fast = score_heads(toy_vlm, items, utility=utility, batch_size=16, progress=False)
        slow = score_heads_reference(toy_vlm, items, utility=utility, progress=False)
        assert fast.scores.shape == (toy_vlm.arch.num_layers, toy_vlm.arch.num_heads)
        assert (fast.scores - slow.scores).abs().max() <= 2e-5
        assert fast.base == pytest.approx(slow.base, abs=1e-5)
    assert fast.scores.abs().sum() > 0       # ablating heads of a trained model does something


def test_head_score_is_the_utility_drop_of_that_head(toy_vlm, toy_items):
    items = toy_items("ocr")[:5]
    scores = score_heads(toy_vlm, items, utility="logprob", batch_size=8, progress=False)
    layer, head = scores.top(1)[0]
    ablated = utilities(toy_vlm, items, [Plan.ablate_heads([(layer, head)])], "logprob", batch_size=8)[0]
    # batches of (item, head) rows vs. the 5 items under one plan: other shapes, so up to rounding (<= 1.2e-6 seen)
    assert scores.scores[layer, head] == pytest.approx(scores.base - ablated, abs=1e-5)
    # metric utility by hand: greedy answers under the plan, scored with the task metric
    plan = Plan.ablate_heads([(layer, head)])
    answers = predict(toy_vlm, items, plans=plan)
    by_hand = metrics.aggregate("anls", answers, references(items))   # the same 5-row batch as `utilities` runs
    assert utilities(toy_vlm, items, [plan], "metric", batch_size=8)[0] == pytest.approx(by_hand)


def test_resume_skips_finished_layers(toy_vlm, toy_items):
    items = toy_items("vqa")[:4]
    seen = []
    full = score_heads(toy_vlm, items, utility="logprob", progress=False, on_layer=lambda l, s: seen.append(l))
    assert seen == list(range(toy_vlm.arch.num_layers))
    done = {0: full.scores[0].tolist(), 1: full.scores[1].tolist()}
    seen.clear()
    resumed = score_heads(toy_vlm, items, utility="logprob", done=done, base=full.base, progress=False,
                          on_layer=lambda l, s: seen.append(l))
    assert seen == list(range(2, toy_vlm.arch.num_layers))
    assert torch.equal(resumed.scores, full.scores)   # the remaining layers run the very same batches: bitwise


def test_top_heads_and_default_k():
    scores = HeadScores(torch.tensor([[0.1, 0.5], [0.5, -0.2]]), base=1.0, utility="metric")
    assert scores.top(2) == [(0, 1), (1, 0)]          # ties: lower layer first
    # round(0.03 * 1024) = round(30.72) = 31 (the paper's 30 for LLaVA-1.5-7B is set explicitly, not by this rule);
    # 4 x 4 heads: 0.48 rounds to 0, and the floor is 4
    assert default_top_heads(32, 32) == 31 and default_top_heads(28, 28) == 24 and default_top_heads(4, 4) == 4
    with pytest.raises(ValueError, match="utility must be one of metric, logprob"):
        utilities(None, [], [None], "accuracy", batch_size=1)
