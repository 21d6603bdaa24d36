import pytest
import torch

from hones_core import metrics
from hones_core.evaluation import predict, references
from hones_core.interventions import Plan
from hones_core.localization import (HeadScores, ablated_answers, default_top_heads, score_heads,
                                     score_heads_reference, trace_bytes_per_item, utilities)


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


def _plain_answers(vlm, items, layer):
    """Greedy answers of every (item, head of `layer`) row, one row at a time: the reference's own computation."""
    return [[vlm.generate([item.load_image()], [item.prompt], plans=Plan.ablate_heads([(layer, h)]))[0]
             for h in range(vlm.arch.num_heads)] for item in items]


def test_verified_scores_are_the_reference_scores_on_the_toy(toy_vlm, toy_items):
    # metric: greedy answers, so the scores are equal exactly (rows near a tie are decoded the reference's
    # way); captions are long, so ablations change answers mid-way (departures at k > 0)
    for task in ("vqa", "caption"):
        items = toy_items(task)[:4]
        fast = score_heads(toy_vlm, items, utility="metric", batch_size=16, progress=False)
        slow = score_heads_reference(toy_vlm, items, utility="metric", progress=False)
        # the same greedy answers give the same metric; 1e-6 leaves room only for the order of float sums
        # (one changed answer moves a score by at least 1 / (items x heads))
        assert (fast.scores - slow.scores).abs().max() <= 1e-6 and abs(fast.base - slow.base) <= 1e-6
        counts = fast.counts
        assert counts["rows"] == len(items) * 16
        assert counts["verified"] + counts["departed"] + counts["near_tie"] + counts["untraced_rows"] >= counts["rows"]
        assert counts["disagreed"] == 0
        if task == "caption":
            assert any(k > 0 for k in counts["departures"]), counts
            assert counts["decoded"] > 0
        else:
            assert counts["verified"] > counts["departed"]      # most heads do not change a short answer
    assert fast.scores.abs().sum() > 0


@pytest.mark.parametrize("family", ["llava", "llava-qwen2", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "idefics3"])
def test_verified_answers_are_plain_greedy_answers_on_every_family(tiny_vlm, toy_items, family):
    # random tiny models: ablating any head changes the (gibberish) answer somewhere, often after a few tokens
    vlm = tiny_vlm(family)
    items = toy_items("caption")[:3]
    departures: dict[int, int] = {}
    for layer in range(vlm.arch.num_layers):
        answers, counts = ablated_answers(vlm, items, layer, batch_size=8)
        assert answers == _plain_answers(vlm, items, layer)
        assert counts["disagreed"] == 0
        for k, n in counts["departures"].items():
            departures[k] = departures.get(k, 0) + n
    assert any(k > 0 for k in departures), departures       # answers that change mid-way were decoded on


def test_near_ties_are_decoded_step_by_step(toy_vlm, toy_items):
    items = toy_items("vqa")[:3]
    want = _plain_answers(toy_vlm, items, 1)
    # every gap is "near" a threshold of 1e9: every row is decoded alone from its prompt, and gives the same answers
    answers, counts = ablated_answers(toy_vlm, items, 1, batch_size=8, near_tie=1e9)
    assert answers == want and counts["near_tie"] == counts["rows"] == 3 * 4 and counts["verified"] == 0
    assert counts["base_near_tie"] == 3                     # the base answers too
    answers, counts = ablated_answers(toy_vlm, items, 1, batch_size=8, near_tie=0.0)
    assert answers == want and counts["near_tie"] == 0 and counts["verified"] + counts["departed"] == 12


def test_logprob_and_retrieval_start_at_the_ablated_layer(toy_vlm, toy_items):
    # one base pass per chunk of items: later layers do not run the vision tower or the layers before them again
    items = toy_items("retrieval")[:3]
    fast = score_heads(toy_vlm, items, utility="metric", batch_size=40, progress=False)
    slow = score_heads_reference(toy_vlm, items, utility="metric", progress=False)
    # NDCG@5 of candidate margins that agree to float rounding: equal unless two margins nearly tie
    # 5 candidates x 4 heads = 20 rows per item: chunks of 2 items in batches of 40 rows, one base pass each
    assert (fast.scores - slow.scores).abs().max() <= 1e-6 and fast.counts["traces"] == 2
    items = toy_items("caption")[:3]
    fast = score_heads(toy_vlm, items, utility="logprob", batch_size=16, progress=False)
    slow = score_heads_reference(toy_vlm, items, utility="logprob", progress=False)
    assert (fast.scores - slow.scores).abs().max() <= 2e-5 and fast.counts["traces"] == 1
    kept_none = score_heads(toy_vlm, items, utility="logprob", batch_size=16, progress=False, trace_memory=0)
    assert torch.equal(kept_none.scores, fast.scores) and kept_none.counts["traces"] == 1 + 4   # again per layer


def test_trace_cost_per_item():
    # LLaVA-1.5-7B in bfloat16: 32 layers x 640 tokens x 4096 x 2 bytes
    assert trace_bytes_per_item(layers=32, tokens=640, hidden=4096, bytes_per_value=2) == 167_772_160
