"""Masking evaluation: how much a task's metric drops when its selected neurons are zeroed.

Every method's neuron set (HONES, activation, unconditioned DVP, random with the same
per-layer counts) is masked at every position on a held-out split, at the same budget.
All methods run in shared batches: each (item, method) row carries its own plan.

Budget curves (`budget_curves`): every method at every budget, in one set of shared batches.

Cross-task analysis: the 4 x 4 cross-ablation matrix (`cross_ablation`: mask task A's top set,
relative drop on task B) with a specificity number (diagonal minus off-diagonal mean), and the
tasks' HONES sets split into groups by how many tasks share a neuron (task-specific, shared by
2, by 3, by all 4; `selection.overlap_groups`): masking each group that touches a task shows
whether the task relies on its own neurons or on shared ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from . import metrics
from .distributed import Shard
from .evaluation import predict, references
from .interventions import Plan
from .models import VLM
from .selection import Selection, size
from .tasks import TASKS, TaskItem


def drop(base: float, masked: float) -> dict[str, float]:
    """Absolute and relative (% of base) drop; relative is 0 when the base metric is 0."""
    absolute = base - masked
    return {"base": base, "masked": masked, "abs_drop": absolute,
            "rel_drop": 100.0 * absolute / base if base else 0.0}


def evaluate_selections(vlm: VLM, items: Sequence[TaskItem], selections: Mapping[str, Selection], *,
                        batch_size: int = 32, factor: float = 0.0, shard: Shard = Shard()
                        ) -> dict[str, dict[str, float]]:
    """Metric with each selection masked (or scaled by `factor`), against the unmasked model.

    Besides the drop, each result counts the items whose answer the masking changed
    (`"changed"` of `"items"`): the cleaned answer string, or for yes/no-scored tasks
    (retrieval) the top-ranked candidate. A batch holds whole items (every plan's row of an
    item), so each masked answer is compared with the base answer of the same batch.

    With several processes (`shard`) each runs its share of the batches; metric statistics and
    change counts are summed over processes before the metric is taken.
    """
    names = list(selections)
    plans = [None] + [Plan.scale_neurons(selections[name], factor) for name in names]
    k = len(plans)
    task = items[0].task
    metric = TASKS[task].metric
    refs = references(items)
    stats = torch.zeros(k, metrics.statistics_size(metric), dtype=torch.float64)
    changed = torch.zeros(k, dtype=torch.float64)
    for batch in shard.batches(len(items), max(1, batch_size // k)):
        rows = [items[i] for i in batch for _ in plans]
        predictions = predict(vlm, rows, plans=[p for _ in batch for p in plans], batch_size=batch_size)
        for p in range(k):
            mine = predictions[p::k]
            stats[p] += torch.tensor(metrics.statistics(metric, mine, [refs[i] for i in batch]), dtype=torch.float64)
            changed[p] += sum(answer_of(a) != answer_of(b) for a, b in zip(mine, predictions[0::k]))
    stats, changed = shard.sum(stats), shard.sum(changed)
    values = [float(metrics.from_statistics(metric, s.tolist())) for s in stats]
    return {name: {**drop(values[0], value), "neurons": size(selections[name]), "changed": int(changed[p + 1]),
                   "items": len(items)}
            for p, (name, value) in enumerate(zip(names, values[1:]))}


def answer_of(prediction) -> object:
    """What counts as "the answer" of a prediction: the text, or the top candidate's index (first on ties)."""
    if isinstance(prediction, str):
        return prediction
    return max(range(len(prediction)), key=lambda i: (prediction[i], -i))


def budget_curves(vlm: VLM, items: Sequence[TaskItem], ranking, methods: Sequence[str], budgets_pct: Sequence[float],
                  *, seed: int = 0, batch_size: int = 32, shard: Shard = Shard()) -> dict[str, dict[str, dict]]:
    """Every method masked at every budget on one task's held-out items, in shared batches.

    Args:
        ranking: the task's `rankings.TaskRanking`.
        budgets_pct: budgets in percent of all (layer, neuron) pairs.

    Returns:
        `{method: {"<budget>": drop dict (base, masked, abs_drop, rel_drop, neurons)}}`, the budget
        keys formatted with `budget_key`.
    """
    selections = {(m, b): ranking.select(m, b / 100, seed=seed) for m in methods for b in budgets_pct}
    flat = evaluate_selections(vlm, items, {f"{m}@{b}": s for (m, b), s in selections.items()},
                               batch_size=batch_size, shard=shard)
    return {m: {budget_key(b): flat[f"{m}@{b}"] for b in budgets_pct} for m in methods}


def budget_key(pct: float) -> str:
    """A budget in percent as a JSON key: "0.5", "1", "2"."""
    return f"{pct:g}"


def cross_ablation(vlm: VLM, items_by_task: Mapping[str, Sequence[TaskItem]], artifact, methods: Sequence[str],
                   ratio: float, *, seed: int = 0, batch_size: int = 32, shard: Shard = Shard()) -> dict[str, dict]:
    """Mask task A's top set, measure the relative drop on task B, for every pair of tasks and every method.

    Each task's items are evaluated once, under every (method, task A) set in shared batches, so
    the unmasked metric of a task is computed once, not once per method.

    Returns:
        `{method: {"tasks": [...], "matrix": [[rel_drop of row task A's set on column task B]],
        "specificity": float}}`: specificity is the mean diagonal drop minus the mean off-diagonal
        drop (percentage points; high means each task's neurons matter for that task more than for
        the others).
    """
    tasks = list(items_by_task)
    sets = {f"{m}@{a}": artifact.task(a).select(m, ratio, seed=seed) for m in methods for a in tasks}
    matrices = {m: [[0.0] * len(tasks) for _ in tasks] for m in methods}
    for j, b in enumerate(tasks):
        drops = evaluate_selections(vlm, items_by_task[b], sets, batch_size=batch_size, shard=shard)
        for m in methods:
            for i, a in enumerate(tasks):
                matrices[m][i][j] = drops[f"{m}@{a}"]["rel_drop"]
    return {m: {"tasks": tasks, "matrix": matrix, "specificity": specificity(matrix)}
            for m, matrix in matrices.items()}


def specificity(matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean diagonal minus mean off-diagonal entry of a square matrix (None below 2 x 2)."""
    n = len(matrix)
    if n < 2:
        return None
    diagonal = sum(matrix[i][i] for i in range(n)) / n
    off = sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return diagonal - off



def report(vlm: VLM, items_by_task: Mapping[str, Sequence[TaskItem]], artifact, *, methods: Sequence[str],
           ratio: float, budgets_pct: Sequence[float] = (), cross: bool = False, seed: int = 0, batch_size: int = 32,
           shard: Shard = Shard()) -> dict:
    """What `mask-eval` prints (and, with `--into-rankings`, stores as evaluation.json).

    Returns:
        `{"ratio", "tasks": {task: {method: drop}}}` at `ratio`; with `budgets_pct`,
        `"budgets_pct"` and `"drops": {task: {method: {budget: drop}}}`; with `cross`, the Jaccard
        overlaps and cross-task groups of the HONES sets (`"jaccard"`, `"cross"`) and, per method, the
        cross-ablation matrix at `ratio` (`"cross_ablation": {method: {"tasks", "matrix", "specificity"}}`).
    """
    from .selection import jaccard, overlap_groups

    out: dict = {"ratio": ratio, "methods": list(methods), "tasks": {}}
    ratio_pct = round(ratio * 100, 10)      # 0.05 * 100 is 5.000000000000001
    at_ratio = budget_key(ratio_pct)
    budgets = sorted({float(b) for b in budgets_pct} | {ratio_pct})
    drops = {}
    for task, items in items_by_task.items():
        # the budget curves and the ratio's column in one evaluation: the unmasked metric computed once
        ranking = artifact.task(task)
        curves = budget_curves(vlm, items, ranking, methods, budgets, seed=seed, batch_size=batch_size, shard=shard)
        out["tasks"][task] = {m: dict(curve[at_ratio]) for m, curve in curves.items()}
        shortfall = ranking.shortfall("hones", ratio)
        if shortfall and "hones" in methods:
            out["tasks"][task]["hones"]["shortfall"] = shortfall
        drops[task] = {m: {budget_key(b): curve[budget_key(b)] for b in budgets_pct} for m, curve in curves.items()}
    if budgets_pct:
        out["budgets_pct"] = sorted(float(b) for b in budgets_pct)
        out["drops"] = drops
    if cross:
        hones = {task: artifact.task(task).select("hones", ratio) for task in items_by_task}
        out["jaccard"] = {a: {b: jaccard(hones[a], hones[b]) for b in hones} for a in hones}
        out["cross"] = {task: evaluate_selections(vlm, items_by_task[task], groups, batch_size=batch_size,
                                                  shard=shard)
                        for task, groups in overlap_groups(hones).items()}
        out["cross_ablation"] = cross_ablation(vlm, items_by_task, artifact, methods, ratio, seed=seed,
                                               batch_size=batch_size, shard=shard)
    return out


__all__ = ["drop", "evaluate_selections", "answer_of", "budget_curves", "budget_key", "cross_ablation", "specificity",
           "report"]
