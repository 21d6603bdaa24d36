"""A bounded soak of the launched app: many mixed requests from many threads, loopback only.

    python -m benchmarks.soak                      # 200 requests, 16 threads, the bundled toy VLM
    python -m benchmarks.soak --requests 50 --threads 4

Starts `python app.py` on a free loopback port, warms it up with `--warmup` requests of the
same mix from the same threads (not counted; the memory baseline is taken after them), then sends
`--requests` requests from `--threads` threads (one gradio_client each): the four tasks'
bundled examples under mixed factors, budgets and neuron sets, and about 20 % bad inputs
(empty question, no image, a text file as image, too few candidates, a budget of 0, a factor
of 7, an unknown neuron set). Then a second, fresh app process answers every distinct good
request alone, one at a time, and each concurrent answer is compared with it (base and
steered answers, the summary without its timing line, the retrieval table).

Prints one JSON line: requests sent, answered, errors by kind (expected rejections and
anything unexpected), mismatches, p50/p95 latency of the concurrent phase, and the server's
resident memory before (after the warm-up) and after the soak. Bounded in count and
time (`--deadline` seconds for the whole soak); exits 1 if a mismatch or an unexpected error
occurred or memory grew by more than 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAD_SHARE = 0.2
FACTORS = (0.0, 0.5, 1.0, 2.0, 3.0)
BUDGETS = (0.5, 1.0, 2.0, 5.0)
SETS = ("hones", "hones", "random", "activation", "dvp", "learned")
BAD_KINDS = {   # kind -> what the error message must contain
    "empty_question": "question is empty",
    "no_image": "No image",
    "not_an_image": "not an image",
    "few_candidates": "at least 2",
    "budget_zero": "above 0",
    "factor_seven": "between 0 and 3",
    "unknown_set": "not in the list of choices",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """`python app.py` on a loopback port, stopped on exit."""

    def __init__(self, log: Path, timeout: float = 180):
        self.port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HONES_PORT": str(self.port),
               "HONES_HOST": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.process.returncode}; see {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the app did not listen on port {self.port} within {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _requests(n: int, seed: int, scratch: Path) -> list[dict]:
    from hones_core.demo import read_examples
    from hones_core.assets import DEFAULT_EXAMPLES

    examples = [e for rows in read_examples(DEFAULT_EXAMPLES).values() for e in rows]
    text_file = scratch / "notes.txt"
    text_file.write_text("not an image")
    rng = random.Random(seed)
    out = []
    for k in range(n):
        example = rng.choice(examples)
        case = {"example": example, "factor": rng.choice(FACTORS), "budget": rng.choice(BUDGETS),
                "method": rng.choice(SETS), "image": example["image"], "bad": None}
        if rng.random() < BAD_SHARE:
            kind = rng.choice(sorted(BAD_KINDS))
            case["bad"] = kind
            if kind == "empty_question":
                case["example"] = {**example, "task": "vqa", "question": ""}
            elif kind == "no_image":
                case["image"] = None
            elif kind == "not_an_image":
                case["image"] = str(text_file)
            elif kind == "few_candidates":
                case["example"] = {**example, "task": "retrieval", "candidates": ["only one"], "answer": ""}
            elif kind == "budget_zero":
                case["budget"] = 0
            elif kind == "factor_seven":
                case["factor"] = 7.0
            else:
                case["method"] = "magic"
        out.append(case)
    return out


def _args(case: dict) -> tuple:
    from gradio_client import handle_file

    e = case["example"]
    return (e["task"], None if case["image"] is None else handle_file(case["image"]), e.get("question", ""),
            ", ".join(str(v) for v in e.get("bbox", [])), "\n".join(e.get("candidates", [])), e.get("answer", ""),
            case["factor"], case["budget"], case["method"])


def _key(case: dict) -> str:
    return json.dumps(_args_plain(case), sort_keys=True)


def _args_plain(case: dict) -> list:
    e = case["example"]
    return [e["task"], case["image"], e.get("question", ""), e.get("bbox"), e.get("candidates"), e.get("answer", ""),
            case["factor"], case["budget"], case["method"]]


def _view(result) -> dict:
    """What a visitor reads: both answers, the summary without its timing line, the retrieval table."""
    def text(value):
        return "".join(part["token"] for part in value or []).strip()
    table = result[3]
    rows = table.get("value", {}).get("data") if isinstance(table, dict) and table.get("value") else None
    summary = "\n".join(line for line in (result[2] or "").split("\n\n") if not line.startswith("Computed in"))
    return {"base": text(result[0]), "steered": text(result[1]), "summary": summary, "table": rows}


def soak(n_requests: int, n_threads: int, seed: int, deadline_s: float, n_warmup: int = 32) -> dict:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    scratch = Path(tempfile.mkdtemp(prefix="hones-soak-"))
    cases = _requests(n_requests, seed, scratch)
    started = time.monotonic()
    server = Server(scratch / "server.log")
    try:
        local = threading.local()
        # warm-up: the same kind of traffic, from the same threads, not counted (imports, caches and
        # per-thread allocator arenas fill here; growth after it is what a leak would show)
        warm_cases = _requests(n_warmup, seed + 1, scratch)

        def warm(index: int) -> None:
            if not hasattr(local, "client"):
                local.client = Client(server.url, verbose=False, download_files=False)
            case = warm_cases[index]
            try:
                local.client.predict(*_args(case), api_name="/run")
            except AppError as err:     # only a bad input may be refused, and with its own message
                if case["bad"] is None or BAD_KINDS[case["bad"]] not in str(err):
                    raise RuntimeError(f"warm-up request {index} ({case['bad'] or 'good'}) failed: {err}") from err
        pool = ThreadPoolExecutor(n_threads)
        list(pool.map(warm, range(len(warm_cases))))
        rss_before = _rss_mb(server.process.pid)
        results: list[dict] = [{} for _ in cases]

        def one(index: int) -> None:
            if time.monotonic() - started > deadline_s:
                results[index] = {"skipped": True}
                return
            if not hasattr(local, "client"):
                local.client = Client(server.url, verbose=False, download_files=False)
            case = cases[index]
            t0 = time.perf_counter()
            try:
                out = local.client.predict(*_args(case), api_name="/run")
                results[index] = {"view": _view(out), "s": time.perf_counter() - t0}
            except AppError as err:
                results[index] = {"error": str(err), "s": time.perf_counter() - t0}
            except Exception as err:   # noqa: BLE001  counted and reported by kind, never dropped
                results[index] = {"failure": f"{type(err).__name__}: {err}", "s": time.perf_counter() - t0}

        try:
            list(pool.map(one, range(len(cases))))      # the same threads and clients as the warm-up
        finally:
            pool.shutdown()
        rss_after = _rss_mb(server.process.pid)
    finally:
        server.stop()

    # the same good requests, each alone, on a fresh server (nothing cached)
    alone: dict[str, dict] = {}
    fresh = Server(scratch / "server-alone.log")
    try:
        client = Client(fresh.url, verbose=False, download_files=False)
        for case, got in zip(cases, results):
            if case["bad"] is None and "view" in got and _key(case) not in alone:
                alone[_key(case)] = _view(client.predict(*_args(case), api_name="/run"))
    finally:
        fresh.stop()

    errors: dict[str, int] = {}
    mismatches, latencies = [], []
    for index, (case, got) in enumerate(zip(cases, results)):
        if got.get("skipped"):
            errors["skipped_after_deadline"] = errors.get("skipped_after_deadline", 0) + 1
            continue
        latencies.append(got["s"])
        if case["bad"] is not None:
            message = got.get("error", "")
            kind = case["bad"] if BAD_KINDS[case["bad"]] in message else f"unexpected_answer_to_{case['bad']}"
            errors[kind] = errors.get(kind, 0) + 1
        elif "view" not in got:
            kind = "unexpected_error" if "error" in got else "client_failure"
            errors[kind] = errors.get(kind, 0) + 1
            mismatches.append({"request": index, "got": got.get("error") or got.get("failure")})
        elif got["view"] != alone[_key(case)]:
            mismatches.append({"request": index, "concurrent": got["view"], "alone": alone[_key(case)]})
    answered = sum(1 for g in results if "view" in g or "error" in g)
    latencies.sort()
    return {
        "requests": len(cases), "threads": n_threads, "warmup_requests": n_warmup, "answered": answered,
        "good": sum(1 for c in cases if c["bad"] is None), "bad": sum(1 for c in cases if c["bad"] is not None),
        "errors": dict(sorted(errors.items())), "mismatches": len(mismatches), "mismatch_examples": mismatches[:3],
        "distinct_good_requests": len(alone),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 3) if latencies else None,
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=32, help="requests sent first and not counted (memory baseline)")
    p.add_argument("--deadline", type=float, default=900, help="seconds for the concurrent phase, at most")
    args = p.parse_args(argv)
    report = soak(args.requests, args.threads, args.seed, args.deadline, args.warmup)
    print(json.dumps(report))
    unexpected = any(k.startswith(("unexpected", "client")) for k in report["errors"])
    return 1 if report["mismatches"] or unexpected or report["rss_growth_pct"] > 10 else 0


if __name__ == "__main__":
    sys.exit(main())
