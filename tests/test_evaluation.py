"""Running task items: rows (item, plan) are grouped per item, images loaded once, results unchanged."""

import torch

from hones_core.evaluation import _grouped, gold_logprob, predict
from hones_core.interventions import Plan
from hones_core.tasks import TaskItem


def _rows(items, plans):
    """(item, plan) rows plan by plan, the way head localization builds them."""
    return [item for _ in plans for item in items], [plan for plan in plans for _ in items]


def test_rows_are_grouped_per_item_in_first_appearance_order():
    a, b, c = object(), object(), object()
    assert _grouped([a, b, c, a, b, c]) == [0, 3, 1, 4, 2, 5]
    assert _grouped([a, b, c]) == [0, 1, 2]


def test_repeated_items_share_image_loading_and_give_per_plan_results(toy_vlm, toy_items, monkeypatch):
    items = toy_items("vqa")[:5]
    plans = [None, Plan.ablate_heads([(2, 1)]), Plan.scale_neurons({3: list(range(40))}, 0.0)]
    rows, row_plans = _rows(items, plans)
    loads: list[int] = []
    original = TaskItem.load_image
    monkeypatch.setattr(TaskItem, "load_image", lambda self: (loads.append(id(self)), original(self))[1])
    answers = predict(toy_vlm, rows, plans=row_plans, batch_size=6)
    logp = gold_logprob(toy_vlm, rows, plans=row_plans, batch_size=6)
    assert len(loads) == 2 * len(items)       # once per item and call, not once per (item, plan) row
    for p, plan in enumerate(plans):
        mine = slice(p * len(items), (p + 1) * len(items))
        assert answers[mine] == predict(toy_vlm, items, plans=plan, batch_size=6)
        torch.testing.assert_close(logp[mine], gold_logprob(toy_vlm, items, plans=plan, batch_size=6),
                                   rtol=0, atol=1e-5)


def test_retrieval_rows_are_grouped_too(toy_vlm, toy_items):
    items = toy_items("retrieval")[:3]
    plans = [None, Plan.ablate_heads([(1, 0)])]
    rows, row_plans = _rows(items, plans)
    margins = predict(toy_vlm, rows, plans=row_plans, batch_size=8)
    for p, plan in enumerate(plans):
        alone = predict(toy_vlm, items, plans=plan, batch_size=8)
        for got, want in zip(margins[p * len(items):(p + 1) * len(items)], alone):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
