"""Speed of head localization, quoted in the README; prints one JSON line with the ratios of one run.

    python -m benchmarks.rank --model assets/toy-vlm --task vqa --limit 32
    python -m benchmarks.rank --model assets/toy-vlm --processes 1,2     # the whole rank command per process count

(`python -m hones_core bench-rank ...` is the same command.) By default it times the
one-head-one-item loop against batched per-row plans for both utilities on a fresh split of
the synthetic world; with `--processes` it times whole `rank` runs with each number of
processes on the CPU and checks that their artifacts agree.
"""

from __future__ import annotations

import argparse
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

from hones_core import rankings
from hones_core.cli import add_model_arguments
from hones_core.data import read_records
from hones_core.localization import score_heads, score_heads_reference
from hones_core.models import VLM, load_vlm
from hones_core.tasks import TASKS, TaskItem, items_for_task


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
    """Head localization: the one-head-one-item loop vs `score_heads` (verify, then decode; start at the layer).

    For both utilities: seconds of each, their ratio, the largest difference of the head-score
    matrices, and what `score_heads` did with its rows (verified without decoding, decoded on,
    near-tie fallbacks); then the Spearman correlation of the two utilities' scores and a projection
    of the work for the paper's two models (`projection`).
    """
    out: dict = {"task": items[0].task, "items": len(items), "heads": vlm.arch.num_layers * vlm.arch.num_heads,
                 "batch_size": batch_size, "threads": torch.get_num_threads()}
    scores, answer_tokens, departed = {}, None, None
    for utility in ("metric", "logprob"):
        reference, t_ref = _timed(lambda: score_heads_reference(vlm, items, utility=utility, progress=False))
        ours, t_new = _timed(lambda: score_heads(vlm, items, utility=utility, batch_size=batch_size,
                                                 progress=False))
        scores[utility] = ours.scores
        counts = ours.counts
        out[utility] = {"reference_s": round(t_ref, 2), "batched_s": round(t_new, 3),
                        "ratio": round(t_ref / t_new, 2),
                        "max_abs_diff": float((reference.scores - ours.scores).abs().max()),
                        "rows": counts.get("rows", 0), "rows_verified": counts.get("verified", 0),
                        "rows_departed": counts.get("departed", 0), "rows_decoded": counts.get("decoded", 0),
                        "near_tie_fallbacks": counts.get("near_tie", 0), "disagreed": counts.get("disagreed", 0),
                        "base_passes": counts.get("traces", 0)}
        if utility == "metric" and counts.get("rows"):
            departed = counts.get("departed", 0) / counts["rows"]
            answer_tokens = counts.get("answer_tokens")
    out["spearman_metric_vs_logprob"] = round(spearman(scores["metric"], scores["logprob"]), 4)
    # the toy's 16 heads all matter, so many of its rows depart; a 7B model's 1 024 heads mostly do not
    out["projection"] = projection(items[0].task, answer_tokens=answer_tokens, departed=departed)
    out["projection_departed_5pct"] = projection(items[0].task, answer_tokens=answer_tokens, departed=0.05)
    return out


# Published configs (their config.json): text layers, query heads, hidden size, image tokens per image.
# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px -> 24 x 24 = 576 image tokens. Qwen2.5-VL-7B: the image token
# count depends on the resolution (14 px patches merged 2 x 2); assumed here: 448 x 448 px ->
# (448 / 14)^2 / 4 = 256 image tokens.
PAPER_MODELS = {
    "llava-1.5-7b": {"layers": 32, "heads": 32, "hidden": 4096, "image_tokens": 576},
    "qwen2.5-vl-7b": {"layers": 28, "heads": 28, "hidden": 3584, "image_tokens": 256,
                      "assumption": "448x448 px images: (448/14)^2/4 = 256 image tokens"},
}
# text tokens of the prompt (chat template + instruction) and answer lengths assumed per task when the run
# measured none: VQA short phrases, captions one sentence, OCR a word or two; retrieval scores one position
PROMPT_TOKENS = {"vqa": 40, "ocr": 30, "caption": 25, "retrieval": 45}
ANSWER_TOKENS = {"vqa": 3, "ocr": 4, "caption": 16, "retrieval": 0}


def projection(task: str, *, answer_tokens: float | None = None, departed: float | None = None,
               candidates: int = 50, items: int = 1000) -> dict:
    """Forward passes and token-layers (tokens x decoder layers run) of head localization, reference vs ours.

    Per model of `PAPER_MODELS` and `items` discovery items, with T prompt tokens (image + text), A
    answer tokens (+1 stop) and a fraction `departed` of (item, head) rows whose answer changes:
    - reference: (1 + L*H) greedy generations per item, each a prefill of T tokens and A + 1 steps;
      retrieval: (1 + L*H) prompt passes per candidate;
    - ours: one greedy base generation and one teacher-forced base pass per item; each (item, head of
      layer l) row runs layers l..L-1 over T + A tokens once; departed rows are re-decoded from the
      prompt (prefill of T + A tokens, A + 1 steps; an upper bound: they resume at their departure).
    Token-layers is the compute measure (projections and MLP scale with it; attention's quadratic
    part is left out). Passes count batched calls as one pass per row.

    Returns:
        `{model: {"reference": {...}, "ours": {...}, "ratio_token_layers", "ratio_passes", "assumed"}}`.
    """
    a = ANSWER_TOKENS[task] if answer_tokens is None else answer_tokens
    d = 0.05 if departed is None else departed
    out = {}
    for name, m in PAPER_MODELS.items():
        L, H = m["layers"], m["heads"]
        t = m["image_tokens"] + PROMPT_TOKENS[task]
        rows = L * H * items
        partial = H * items * L * (L + 1) / 2              # sum over layers l of H * items * (L - l) layers
        if task == "retrieval":
            seqs = items * candidates
            reference = {"passes": (1 + L * H) * seqs, "token_layers": (1 + L * H) * seqs * L * t}
            ours = {"passes": seqs + L * H * seqs, "token_layers": seqs * L * t + partial * candidates * t}
        else:
            steps = a + 1
            generation = {"passes": 1 + steps, "token_layers": L * (t + steps)}
            reference = {k: (1 + L * H) * items * v for k, v in generation.items()}
            ours = {"passes": items * (generation["passes"] + 1) + rows + d * rows * generation["passes"],
                    "token_layers": items * (generation["token_layers"] + L * (t + a)) + partial * (t + a)
                    + d * rows * generation["token_layers"]}
        out[name] = {"reference": {k: int(v) for k, v in reference.items()},
                     "ours": {k: int(v) for k, v in ours.items()},
                     "ratio_token_layers": round(reference["token_layers"] / ours["token_layers"], 1),
                     "ratio_passes": round(reference["passes"] / ours["passes"], 1),
                     "assumed": {"items": items, "prompt_tokens": t, "answer_tokens": round(a, 2),
                                 "departed": round(d, 3), **({"candidates": candidates} if task == "retrieval" else {}),
                                 **({"note": m["assumption"]} if "assumption" in m else {})}}
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


def _items(args: argparse.Namespace) -> tuple[str, list[TaskItem]]:
    """The data file (a fresh synthetic-world split unless --data) and its items of --task."""
    data_file = args.data
    if data_file is None:
        from hones_core.toy import world

        tmp = Path(args.workdir or "runs/bench-world")
        world.write_world(tmp, seed=args.seed + 1000, n_discovery=max(args.limit or 32, 32), n_dev=1, n_test=1,
                          progress=False)
        data_file = str(tmp / "discovery.json")
    records = read_records(data_file, args.images)
    return data_file, items_for_task(args.task, records, n_negatives=args.n_negatives, seed=args.seed,
                                     limit=args.limit)


def run(args: argparse.Namespace) -> dict:
    """The benchmark `args` ask for (`bench_processes` with --processes, else `bench_rank`)."""
    data_file, items = _items(args)
    if args.processes:
        counts = sorted({int(n) for n in args.processes.split(",")})
        rank_args = ["--model", args.model, "--data", data_file, "--task", args.task, "--limit", str(len(items)),
                     "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--n-negatives",
                     str(args.n_negatives), "--device", "cpu", "--dtype", args.dtype,
                     *(["--revision", args.revision] if args.revision else []),
                     *(["--trust-remote-code"] if args.trust_remote_code else [])]
        return bench_processes(rank_args, counts, n_items=len(items), workdir=args.processes_workdir)
    vlm = load_vlm(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                   trust_remote_code=args.trust_remote_code, compat=args.compat)
    return bench_rank(vlm, items, batch_size=args.batch_size)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "python -m benchmarks.rank",
                                description="batched head localization vs the one-head-one-item loop")
    add_model_arguments(p)
    p.add_argument("--data", default=None, help="data file (default: a fresh synthetic-world split)")
    p.add_argument("--images", default=None)
    p.add_argument("--task", default="vqa", choices=list(TASKS))
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-negatives", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workdir", default=None, help="where the generated split goes (default runs/bench-world)")
    p.add_argument("--processes", default=None,
                   help="e.g. 1,2: instead, time the whole rank command on the CPU with each number of processes "
                        "(accelerate launch, gloo) and check that the artifacts agree")
    p.add_argument("--processes-workdir", default=None,
                   help="empty folder for those runs' artifacts (default: a temp dir)")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse `argv`, run, print the result as one JSON line."""
    args = build_parser(prog).parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
