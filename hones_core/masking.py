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
from .selection import Selection, size
from .tasks import TaskItem


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
    return {name: {**drop(values[0], value), "neurons": size(selections[name])}
            for name, value in zip(names, values[1:])}


__all__ = ["drop", "evaluate_selections"]
