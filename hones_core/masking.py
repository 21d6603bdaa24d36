"""Masking evaluation: how much a task's metric drops when its selected neurons are zeroed.

Every method's neuron set (HONES, activation, unconditioned DVP, random with the same
per-layer counts) is masked at every position on a held-out split, at the same budget.
All methods run in shared batches: each (item, method) row carries its own plan.

Cross-task analysis: the tasks' HONES sets are split into groups by how many tasks share
a neuron (task-specific, shared by 2, by 3, by all 4); masking each group that touches a
task shows whether the task relies on its own neurons or on shared ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .distributed import Shard
from .interventions import Plan
from .localization import utilities
from .models import VLM
from .tasks import TaskItem

Selection = dict[int, list[int]]


def drop(base: float, masked: float) -> dict[str, float]:
    """Absolute and relative (% of base) drop; relative is 0 when the base metric is 0."""
    absolute = base - masked
    return {"base": base, "masked": masked, "abs_drop": absolute,
            "rel_drop": 100.0 * absolute / base if base else 0.0}


def evaluate_selections(vlm: VLM, items: Sequence[TaskItem], selections: Mapping[str, Selection], *,
                        batch_size: int = 32, factor: float = 0.0, shard: Shard = Shard()
                        ) -> dict[str, dict[str, float]]:
    """Metric with each selection masked (or scaled by `factor`), against the unmasked model.

    With several processes (`shard`) each runs its share of the batches; metric statistics are
    summed over processes before the metric is taken.
    """
    names = list(selections)
    plans = [None] + [Plan.scale_neurons(selections[name], factor) for name in names]
    values = utilities(vlm, items, plans, "metric", batch_size=batch_size, shard=shard)
    return {name: {**drop(values[0], value), "neurons": _size(selections[name])}
            for name, value in zip(names, values[1:])}


def _size(selection: Selection) -> int:
    return sum(len(v) for v in selection.values())


def as_set(selection: Selection) -> set[tuple[int, int]]:
    return {(layer, n) for layer, neurons in selection.items() for n in neurons}


def from_set(pairs: set[tuple[int, int]]) -> Selection:
    out: Selection = {}
    for layer, n in sorted(pairs):
        out.setdefault(layer, []).append(n)
    return out


def jaccard(a: Selection, b: Selection) -> float:
    sa, sb = as_set(a), as_set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def overlap_groups(selections: Mapping[str, Selection]) -> dict[str, dict[str, Selection]]:
    """For each task, its neurons split by how many tasks select them.

    Returns `{task: {"task-specific": ..., "shared by 2": ..., "shared by 3": ..., "shared by all 4": ...}}`
    (group names follow the number of tasks given; empty groups are left out).
    """
    sets = {task: as_set(sel) for task, sel in selections.items()}
    count: dict[tuple[int, int], int] = {}
    for pairs in sets.values():
        for pair in pairs:
            count[pair] = count.get(pair, 0) + 1
    n_tasks = len(sets)

    def name(k: int) -> str:
        return "task-specific" if k == 1 else (f"shared by all {k}" if k == n_tasks else f"shared by {k}")

    out: dict[str, dict[str, Selection]] = {}
    for task, pairs in sets.items():
        groups: dict[str, set] = {}
        for pair in pairs:
            groups.setdefault(name(count[pair]), set()).add(pair)
        out[task] = {group: from_set(members) for group, members in sorted(groups.items(), key=lambda g: len(g[0]))}
    return out
