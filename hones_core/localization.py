"""Critical-head localization: score every text-decoder head by mean-replacement ablation.

S(l, h) = P_t(θ) - P_t(θ_{I_h}), where P_t is the utility on the discovery items and θ_{I_h}
the model with head h of layer l mean-replaced at every position. Two utilities:
- "metric" (the paper's): the task metric from greedy decoding;
- "logprob" (fast): the mean per-token teacher-forced log-probability of the gold answer.

The straightforward algorithm runs 1 + L·H full evaluations one item at a time
(`score_heads_reference`). `score_heads` gives the same scores by batching: the rows of
one batch are (item, head) pairs, each row with its own one-head plan, so all heads of a
layer are evaluated in a few batched forward passes. Results are reported per layer to an
optional callback, which is what makes long runs resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import metrics
from .evaluation import gold_logprob, predict, references
from .distributed import Shard
from .interventions import Plan
from .models import VLM
from .tasks import TASKS, TaskItem

UTILITIES = ("metric", "logprob")


@dataclass
class HeadScores:
    """Head scores of one task.

    Attributes:
        scores: S(l, h), `[layers, heads]` float32 (utility drop when the head is mean-replaced).
        base: P_t(θ), the utility of the unmodified model.
        utility: "metric" or "logprob".
    """
    scores: torch.Tensor
    base: float
    utility: str

    def top(self, k: int) -> list[tuple[int, int]]:
        """The k highest-scoring (layer, head) pairs, best first (ties: lower layer, then head)."""
        flat = self.scores.flatten()
        k = max(1, min(k, flat.numel()))
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
        heads = self.scores.shape[1]
        return [(i // heads, i % heads) for i in order]


def default_top_heads(num_layers: int, num_heads: int) -> int:
    """K_h when none is given: round(3 % of all heads), at least 4.

    LLaVA-1.5-7B has 32 x 32 = 1 024 heads, so the rule gives round(30.72) = 31; the paper's
    configs set K_h explicitly (30 for LLaVA-1.5-7B, 25 for Qwen2.5-VL-7B). The rule is for
    other models; pass `top_heads` to use the paper's value.
    """
    return max(4, round(0.03 * num_layers * num_heads))


def _check_utility(utility: str) -> None:
    if utility not in UTILITIES:
        raise ValueError(f"utility must be one of {', '.join(UTILITIES)}, not {utility!r}")


def utility_of(vlm: VLM, items: Sequence[TaskItem], plans: Plan | Sequence[Plan | None] | None, utility: str,
               *, batch_size: int, shard: Shard = Shard()) -> float:
    """P_t under one plan for all items."""
    return utilities(vlm, items, [plans], utility, batch_size=batch_size, shard=shard)[0]


def utilities(vlm: VLM, items: Sequence[TaskItem], plans: Sequence[Plan | None], utility: str, *,
              batch_size: int, progress: bool = False, shard: Shard = Shard()) -> list[float]:
    """P_t for each plan in `plans`, computed in shared batches of (item, plan) rows.

    With several processes (`shard`), each runs its share of the batches and the metric
    statistics of every plan are summed over processes before the metric is taken.
    """
    _check_utility(utility)
    # item-major rows: a batch holds each item under all plans, so its image is processed once
    # and the layers before the first one where the plans differ run once (sharing.share_prefix)
    k = len(plans)
    rows = [item for item in items for _ in plans]
    row_plans = [plan for _ in items for plan in plans]
    task = items[0].task
    metric = TASKS[task].metric
    refs = references(items)
    stats = torch.zeros(len(plans), 2 if utility == "logprob" else metrics.statistics_size(metric),
                        dtype=torch.float64)
    batches = shard.batches(len(rows), batch_size)
    for batch in tqdm(batches, desc=f"{task} ({utility})", disable=not progress, leave=False):
        chunk, chunk_plans = [rows[i] for i in batch], [row_plans[i] for i in batch]
        if utility == "logprob":
            values = gold_logprob(vlm, chunk, plans=chunk_plans, batch_size=batch_size).double()
        else:
            predictions = predict(vlm, chunk, plans=chunk_plans, batch_size=batch_size)
        for p in sorted({r % k for r in batch}):
            mine = [j for j, r in enumerate(batch) if r % k == p]      # positions in the batch of plan p's rows
            if utility == "logprob":
                stats[p] += torch.tensor([float(values[mine].sum()), len(mine)], dtype=torch.float64)
            else:
                stats[p] += torch.tensor(metrics.statistics(metric, [predictions[j] for j in mine],
                                                            [refs[batch[j] // k] for j in mine]), dtype=torch.float64)
    stats = shard.sum(stats)
    if utility == "logprob":
        return [float(s[0] / s[1]) for s in stats]
    return [float(metrics.from_statistics(metric, s.tolist())) for s in stats]


def score_heads(vlm: VLM, items: Sequence[TaskItem], *, utility: str = "metric", batch_size: int = 32,
                done: dict[int, list[float]] | None = None, base: float | None = None,
                on_layer: Callable[[int, list[float]], None] | None = None, progress: bool = True,
                shard: Shard = Shard()) -> HeadScores:
    """Score every head of every text layer (batched: one plan per (item, head) row).

    Args:
        done: scores of layers finished by an earlier run (`{layer: [score per head]}`); skipped.
        base: P_t(θ) from an earlier run (recomputed when None).
        on_layer: called with (layer, scores) after each layer, e.g. to save progress.
        shard: this process's share of the batches when several processes run (scores are summed over them).
    """
    _check_utility(utility)
    arch = vlm.arch
    done = dict(done or {})
    if base is None:
        base = utility_of(vlm, items, None, utility, batch_size=batch_size, shard=shard)
    for layer in tqdm(range(arch.num_layers), desc=f"heads ({utility})", disable=not progress):
        if layer in done:
            continue
        plans = [Plan.ablate_heads([(layer, h)]) for h in range(arch.num_heads)]
        ablated = utilities(vlm, items, plans, utility, batch_size=batch_size, shard=shard)
        done[layer] = [base - value for value in ablated]
        if on_layer is not None:
            on_layer(layer, done[layer])
    scores = torch.tensor([done[layer] for layer in range(arch.num_layers)], dtype=torch.float32)
    return HeadScores(scores, float(base), utility)


def score_heads_reference(vlm: VLM, items: Sequence[TaskItem], *, utility: str = "metric",
                          progress: bool = True) -> HeadScores:
    """The straightforward algorithm: one head at a time, one item at a time (for benchmarks)."""
    _check_utility(utility)
    arch = vlm.arch

    def one_by_one(plan: Plan | None) -> float:
        if utility == "logprob":
            values = torch.cat([gold_logprob(vlm, [item], plans=plan, batch_size=1) for item in items])
            return float(values.mean())
        predictions = [predict(vlm, [item], plans=plan, batch_size=1)[0] for item in items]
        return float(metrics.aggregate(TASKS[items[0].task].metric, predictions, references(items)))

    base = one_by_one(None)
    scores = torch.zeros(arch.num_layers, arch.num_heads)
    heads = [(l, h) for l in range(arch.num_layers) for h in range(arch.num_heads)]
    for layer, head in tqdm(heads, desc="heads (reference)", disable=not progress):
        scores[layer, head] = base - one_by_one(Plan.ablate_heads([(layer, head)]))
    return HeadScores(scores, base, utility)
