"""Selections: the budget rule, global top, random draws, set views, overlap and groups, by hand."""

import numpy as np
import pytest
import torch

from hones_core.selection import (budget, check_selections, from_flat, jaccard, jaccard_matrix, layer_sums,
                                  overlap_groups, random_like, size, top_flat)


def test_budget_rounds_and_keeps_at_least_one():
    assert budget(0.01, 1536) == 15          # 15.36 -> 15
    assert budget(0.01, 50) == 1             # 0.5 rounds to 0 -> at least one
    assert budget(1.0, 7) == 7
    for bad in (0, 0.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="between 0 % and 100 %"):
            budget(bad, 10)


def test_top_flat_is_the_global_top_with_ties_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0], [0.5, 3.0, 2.0]])       # 3.0 at flat 1, 2, 4
    order, values = top_flat(scores, 0.5)                              # budget 3 of 6
    assert order.tolist() == [1, 2, 4] and values.tolist() == [3.0, 3.0, 3.0]
    assert from_flat(order.tolist(), 3) == {0: [1, 2], 1: [1]}
    assert from_flat([5, 0, 3], 3) == {0: [0], 1: [0, 2]}               # sorted layers, sorted neurons


def test_random_like_keeps_counts_and_is_seeded():
    a = random_like({2: 3, 0: 1}, 10, seed=4)
    assert list(a) == [2, 0] and [len(v) for v in a.values()] == [3, 1]
    assert all(v == sorted(set(v)) and all(0 <= n < 10 for n in v) for v in a.values())
    assert random_like({2: 3, 0: 1}, 10, seed=4) == a
    # the draw is torch.randperm from one generator, layer by layer in the order given
    generator = torch.Generator().manual_seed(4)
    assert a[2] == sorted(torch.randperm(10, generator=generator)[:3].tolist())
    assert a[0] == sorted(torch.randperm(10, generator=generator)[:1].tolist())


def test_jaccard_and_overlap_groups_by_hand():
    selections = {
        "vqa": {0: [1, 2], 1: [5]},
        "ocr": {0: [2], 1: [5, 6]},
        "caption": {1: [5], 2: [9]},
        "retrieval": {1: [5], 0: [2]},
    }
    assert jaccard(selections["vqa"], selections["ocr"]) == pytest.approx(2 / 4)      # {0:2, 1:5} of 4
    assert jaccard(selections["caption"], {3: [1]}) == 0.0
    assert jaccard({}, {}) == 0.0
    assert size(selections["ocr"]) == 3
    groups = overlap_groups(selections)
    # (1, 5) is in all four sets, (0, 2) in three, the rest task-specific
    assert groups["vqa"] == {"task-specific": {0: [1]}, "shared by 3": {0: [2]}, "shared by all 4": {1: [5]}}
    assert groups["caption"] == {"task-specific": {2: [9]}, "shared by all 4": {1: [5]}}
    assert groups["ocr"]["task-specific"] == {1: [6]}


def test_jaccard_by_hand():
    tasks, matrix = jaccard_matrix({
        "a": {0: [1, 2]},          # {a, b}
        "same": {0: [2, 1]},       # identical
        "bc": {0: [2], 1: [1]},    # {b, c}: (0,2) shared, (1,1) new -> 1/3 with "a"
        "disjoint": {5: [9]},
    })
    assert tasks == ["a", "same", "bc", "disjoint"]
    assert matrix[0, 1] == 1.0
    assert matrix[0, 2] == pytest.approx(1 / 3)
    assert matrix[0, 3] == 0.0 and matrix[2, 3] == 0.0
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert jaccard_matrix({"x": {}, "y": {}})[1][0, 1] == 0.0        # two empty sets, as in selection.jaccard



def test_check_selections_refuses_what_is_not_a_selection():
    with pytest.raises(ValueError, match="non-empty dict"):
        check_selections({})
    with pytest.raises(ValueError, match=r"sets\['a'\] must be a dict"):
        check_selections({"a": [1, 2]}, "sets")


def test_layer_sums_add_only_selected_neurons():
    values = np.arange(12, dtype=float).reshape(3, 4)        # [[0..3], [4..7], [8..11]]
    np.testing.assert_array_equal(layer_sums(values, {0: [1, 3], 2: [0]}), [1 + 3, 0, 8])


def test_top_flat_positive_only_drops_scores_at_or_below_zero():
    scores = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    order, values = top_flat(scores, 1.0, positive_only=True)
    assert order.tolist() == [1, 3] and values.tolist() == [2.0, 0.5]
    assert top_flat(scores, 1.0)[0].tolist() == [1, 3, 0, 2]
