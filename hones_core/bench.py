"""Benchmarks quoted in the README: each prints one JSON line with ratios from one run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

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


def launch_command(processes: int, args: Sequence[str]) -> list[str]:
    """`python -m hones_core ARGS` for one process, `accelerate launch ... -m hones_core ARGS` for several."""
    if processes == 1:
        return [sys.executable, "-m", "hones_core", *args]
    with socket.socket() as s:            # a free port, so runs side by side do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "hones_core", *args]


def bench_processes(rank_args: Sequence[str], processes: Sequence[int], *, n_items: int,
                    workdir: str | None = None) -> dict:
    """Wall time of the same `rank` run with each number of processes (CPU, gloo), and the equality check.

    Every run is a fresh command, model loading and process start-up included, exactly as a
    user runs it. Throughput is discovery items ranked per second (head scores and DVP passes).
    One process runs twice: with torch's default threads (all cores) and with one thread, the
    setting `accelerate launch` gives each of several processes (OMP_NUM_THREADS=1), so the
    per-process scaling can be read apart from the threading.
    """
    from . import rankings

    root = Path(workdir or tempfile.mkdtemp(prefix="bench-processes-"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    configs = [(str(n), n, None) for n in processes]
    if 1 in processes:
        configs.insert(processes.index(1) + 1, ("1, 1 thread", 1, "1"))
    runs: dict = {}
    for label, count, threads in configs:
        out = root / label.replace(", ", "-").replace(" ", "")
        if out.exists():
            raise FileExistsError(f"{out} exists; give an empty --processes-workdir (progress there would be resumed)")
        command = launch_command(count, ["rank", *rank_args, "--out", str(out)])
        start = time.perf_counter()
        done = subprocess.run(command, env={**env, **({"OMP_NUM_THREADS": threads} if threads else {})},
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"rank with {label} process(es) failed:\n{done.stderr[-4000:]}")
        runs[label] = {"wall_s": round(wall, 2), "items_per_s": round(n_items / wall, 3), "out": out}
    reference = rankings.load(runs[configs[0][0]]["out"])
    for label, entry in runs.items():
        other = rankings.load(entry.pop("out"))
        entry["speedup_vs_first"] = round(runs[configs[0][0]]["wall_s"] / entry["wall_s"], 2)
        entry["max_abs_diff"] = max(
            float((getattr(reference.tasks[t], name) - getattr(other.tasks[t], name)).abs().max())
            for t in reference.tasks for name in ("head_scores", "importance"))
        entry["same_top_sets"] = all(
            reference.tasks[t].select("hones", 0.01) == other.tasks[t].select("hones", 0.01) for t in reference.tasks)
    return {"items": n_items, "cores": os.cpu_count(), "default_threads": torch.get_num_threads(),
            "note": "several processes: accelerate launch sets OMP_NUM_THREADS=1 per process",
            "runs": runs, "outputs": str(root)}
