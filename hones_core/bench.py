"""Benchmarks quoted in the README: each prints one JSON line with ratios from one run."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .localization import score_heads, score_heads_reference
from .models import VLM
from .tasks import TaskItem


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten().double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.double)
        for value in torch.unique(x):       # average the ranks of ties
            tie = x == value
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator else 0.0


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_rank(vlm: VLM, items: Sequence[TaskItem], *, batch_size: int = 64) -> dict:
    """Head localization: the one-head-one-item loop vs batched per-row plans, both utilities."""
    out: dict = {"task": items[0].task, "items": len(items), "heads": vlm.arch.num_layers * vlm.arch.num_heads,
                 "batch_size": batch_size}
    scores = {}
    for utility in ("metric", "logprob"):
        reference, t_ref = _timed(lambda: score_heads_reference(vlm, items, utility=utility, progress=False))
        batched, t_new = _timed(lambda: score_heads(vlm, items, utility=utility, batch_size=batch_size,
                                                    progress=False))
        scores[utility] = batched.scores
        out[utility] = {"reference_s": round(t_ref, 2), "batched_s": round(t_new, 2),
                        "ratio": round(t_ref / t_new, 2),
                        "max_abs_diff": float((reference.scores - batched.scores).abs().max())}
    out["spearman_metric_vs_logprob"] = round(spearman(scores["metric"], scores["logprob"]), 4)
    return out
