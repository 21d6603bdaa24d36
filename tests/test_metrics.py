import math

import pytest

from hones_core.metrics import (aggregate, anls, bleu_statistics, bleu_from_statistics, corpus_bleu,
                                ndcg_at_k, normalize_vqa_answer, vqa_accuracy)


def test_vqa_normalisation_follows_the_vqav2_script():
    assert normalize_vqa_answer("Two") == "2"
    assert normalize_vqa_answer("  The Red  ") == "red"
    assert normalize_vqa_answer("dont know!") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("yes.") == "yes"
    assert normalize_vqa_answer("3.5") == "3.5"


def test_vqa_accuracy_counts_annotators():
    answers = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two", answers) == 1.0          # 3 matches after normalisation -> min(3/3, 1)
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("2", ["2", "3", "3"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("2", ["2", "2", "3"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("a red", ["red"]) == 1.0 and vqa_accuracy("reds", ["red"]) == 0.0   # single answer
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)     # 1 edit / 5
    assert anls("HELLO ", ["hello"]) == 1.0
    assert anls("abc", ["xyz"]) == 0.0                        # NL = 1 >= 0.5
    assert anls("ab", ["abcd"]) == 0.0                        # NL = 0.5 -> 0
    assert anls("abcd", ["abce", "zzzz"]) == pytest.approx(0.75)


def test_bleu_by_hand():
    assert corpus_bleu(["a red circle and a green square"], [["a red circle and a green square"]]) == 1.0
    # hyp 4 words, closest ref 6 words: precisions 4/4, 3/3, 2/2, 1/1, BP = exp(1 - 6/4)
    value = corpus_bleu(["a red circle and"], [["a red circle and a square", "x"]])
    assert value == pytest.approx(math.exp(1 - 6 / 4))
    assert corpus_bleu(["red circle green square"], [["red green circle square"]]) == 0.0   # no 4-gram match
    hyp, refs = ["a red star and a big cube", "two shapes here now"], [["a red star and a cube"],
                                                                     ["two shapes here now ok"]]
    stats = bleu_statistics(hyp[0], refs[0]) + bleu_statistics(hyp[1], refs[1])
    assert bleu_from_statistics(stats) == corpus_bleu(hyp, refs)
    # hyp 1 matches 6/7, 4/6, 3/5, 2/4 n-grams; hyp 2 all of 4/4, 3/3, 2/2, 1/1
    assert stats.matches == [10, 7, 5, 3] and stats.totals == [11, 9, 7, 5]
    assert stats.hyp_len == stats.ref_len == 11          # closest refs: 6 and 5 words, so BP = 1
    expected = math.exp(sum(math.log(m / t) for m, t in zip(stats.matches, stats.totals)) / 4)
    assert corpus_bleu(hyp, refs) == pytest.approx(expected)


def test_ndcg_with_one_positive():
    assert ndcg_at_k([0.9, 0.1, 0.2], 0) == 1.0
    assert ndcg_at_k([0.1, 0.9, 0.5, 0.3], 3) == pytest.approx(1 / math.log2(4))   # rank 3
    assert ndcg_at_k([6, 5, 4, 3, 2, 1], 5) == 0.0                                  # rank 6 > k
    assert ndcg_at_k([1.0, 1.0, 1.0], 0) == pytest.approx(1 / math.log2(4))         # ties are pessimistic
    with pytest.raises(ValueError, match="NaN"):
        ndcg_at_k([float("nan"), 1.0], 0)
    with pytest.raises(ValueError, match="out of range"):
        ndcg_at_k([1.0], 3)


def test_aggregate_dispatches_per_metric():
    assert aggregate("vqa_accuracy", ["2", "red"], [["two"], ["blue"]]) == 0.5
    assert aggregate("anls", ["helo"], [["hello"]]) == pytest.approx(0.8)
    assert aggregate("ndcg@5", [[0.9, 0.1], [0.1, 0.9]], [0, 0]) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert aggregate("bleu4", ["a b c d"], [["a b c d"]]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'count'; metrics are vqa_accuracy, anls, bleu4, ndcg@5"):
        aggregate("count", ["1"], [["1"]])
