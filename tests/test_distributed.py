"""Sharding rank and mask-eval over processes with accelerate (gloo on CPU).

The multi-process runs go through the real launcher, `accelerate launch`, which starts
torch.distributed workers; results must not depend on the number of processes.
"""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks.rank import launch_command
from hones_core import distributed, metrics, rankings
from hones_core.distributed import Shard

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-vlm"
RANK_ARGS = ["--model", str(TOY), "--device", "cpu", "--task", "all", "--limit", "6", "--batch-size", "4",
             "--n-negatives", "4"]


def _command(processes: int, *args: str) -> list[str]:
    return launch_command(processes, args)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def _run(processes: int, *args: str) -> str:
    done = subprocess.run(_command(processes, *args), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{processes} process(es) failed:\n{done.stdout[-3000:]}\n{done.stderr[-12000:]}"
    # a gloo thread left alive at interpreter exit aborts the process (distributed.shutdown)
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    return done.stdout


def _kill_after_first_layer(args: list[str], state_file: Path) -> None:
    """Start a 2-process run and SIGKILL all its processes once one layer of head scores is recorded."""
    launcher = subprocess.Popen(_command(2, *args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            if state_file.exists() and any(t["heads"] for t in json.loads(state_file.read_text())["tasks"].values()):
                break
            time.sleep(0.05)
        assert launcher.poll() is None, "the run ended before it could be killed"
    finally:
        # torch's launcher starts each worker in a session of its own (start_new_session), so killing the
        # launcher's process group leaves the workers running, and they would race the resumed run
        # (both writing .progress): kill every descendant, then wait until they are gone
        processes = _descendants(launcher.pid)
        os.killpg(launcher.pid, signal.SIGKILL)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in processes):
            assert time.monotonic() < deadline, f"workers {processes} outlived SIGKILL"
            time.sleep(0.05)
    assert len(processes) >= 2, f"expected the launcher's 2 workers among its descendants, found {processes}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "gone"


def _descendants(root: int) -> list[int]:
    """Every process below `root` (Linux /proc), whatever session it is in."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> str:
    """A test split of other images than the discovery split `ranked` was computed on (mask-eval refuses those)."""
    from hones_core.toy import world

    out = tmp_path_factory.mktemp("held-out")
    world.write_world(out, seed=9191, n_discovery=0, n_dev=0, n_test=8, progress=False)
    return str(out / "test.json")


@pytest.fixture(scope="module")
def ranked(toy_world, tmp_path_factory):
    """The same rank run in 1 process, and in 2 processes killed after one layer and resumed."""
    out = tmp_path_factory.mktemp("ranked")
    data = str(toy_world / "discovery.json")
    args = {n: ["rank", *RANK_ARGS, "--data", data, "--out", str(out / str(n))] for n in (1, 2)}
    stdout = {1: _run(1, *args[1])}
    state_file = out / "2" / ".progress" / "state.json"
    _kill_after_first_layer(args[2], state_file)
    killed_state = json.loads(state_file.read_text())
    assert not (out / "2" / "manifest.json").exists()
    stdout[2] = _run(2, *args[2])
    summaries = {}
    for processes, text in stdout.items():
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert len(lines) == 1, f"one JSON summary expected from {processes} process(es), got {text!r}"
        summaries[processes] = lines[0]
    return out, data, summaries, killed_state


def test_one_and_two_processes_give_the_same_rankings_even_after_a_kill(ranked):
    out, _, summaries, killed_state = ranked
    assert summaries[1]["processes"] == 1 and summaries[2]["processes"] == 2
    # the 2-process run was killed part way (some layers of the first task done, not all tasks)
    first = killed_state["tasks"]["vqa"]
    assert 1 <= len(first["heads"]) and len(killed_state["tasks"]) < 4
    one, two = rankings.load(out / "1"), rankings.load(out / "2")
    assert set(one.tasks) == set(two.tasks) == {"vqa", "ocr", "caption", "retrieval"}
    for task in one.tasks:
        a, b = one.tasks[task], two.tasks[task]
        torch.testing.assert_close(a.head_scores, b.head_scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.importance, b.importance, rtol=0, atol=1e-6)
        # the paper's baselines too: AP / MA token sums are reduced like the DVP sums, APE from all four APs
        assert set(a.baselines) == set(b.baselines) == {"activation", "dvp", "ap", "ma", "ape"}
        for name in a.baselines:
            torch.testing.assert_close(a.baselines[name], b.baselines[name], rtol=0, atol=1e-6)
        assert a.top_heads == b.top_heads
        for method in ("hones", "activation", "dvp", "ap", "ma", "ape", "random"):
            assert a.select(method, 0.01) == b.select(method, 0.01), (task, method)
    # the heads were really scored: some head changes every task's metric on these items
    assert all(float(one.tasks[t].head_scores.abs().max()) > 0 for t in one.tasks)
    assert not (out / "2" / ".progress").exists()


def test_mask_eval_with_two_processes_matches_one(ranked, held_out, tmp_path):
    out, _, _, _ = ranked
    results = {}
    for processes in (1, 2):
        json_file = tmp_path / f"{processes}.json"
        args = [a if a != "all" else "caption" for a in RANK_ARGS]      # BLEU: reduced from n-gram statistics
        _run(processes, "mask-eval", *args, "--data", held_out, "--rankings", str(out / "1"), "--top-ratio", "0.05",
             "--drop-overlapping", "--json", str(json_file))
        results[processes] = json.loads(json_file.read_text())
    one, two = results[1], results[2]
    assert two["processes"] == 2 and list(one["tasks"]) == ["caption"]
    for task, methods in one["tasks"].items():
        for method, values in methods.items():
            for key in ("base", "masked", "abs_drop"):
                assert values[key] == pytest.approx(two["tasks"][task][method][key], abs=1e-9), (task, method, key)
    # masking 5 % of the neurons moves the caption metric for at least one method
    assert any(v["abs_drop"] != 0 for v in one["tasks"]["caption"].values())


# Run under `accelerate launch`: set up torch.distributed, run one CLI command in this process, and
# report gloo's threads (named by torch) while the group is up and once the command has returned.
CLI_IN_PROCESS = """
import json, os, sys, time
import torch
import torch.distributed as dist
from hones_core import cli, distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

shard = distributed.current(cpu=True)     # the command's own current() finds this group
shard.sum(torch.ones(1))                  # gloo starts its worker threads with the first collective
during = gloo_threads()
try:
    cli.main(sys.argv[1:])
    outcome = "ok"
except Exception as e:
    outcome = type(e).__name__
deadline = time.monotonic() + 10          # a joined thread may linger in /proc for a moment
while gloo_threads() and time.monotonic() < deadline:
    time.sleep(0.05)
report = {"rank": shard.index, "outcome": outcome, "during": during, "after": gloo_threads(),
          "initialized": dist.is_initialized()}
# one file per process: two processes printing to one pipe can interleave their lines
with open(os.path.join(os.environ["HONES_REPORT_DIR"], f"{shard.index}.json"), "w") as f:
    json.dump(report, f)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
def test_every_command_ends_torch_distributed_also_after_an_error(ranked, held_out, tmp_path):
    """A gloo thread still alive at interpreter exit can abort the process (`distributed.shutdown`)."""
    out, data, _, _ = ranked
    script = tmp_path / "cli_in_process.py"
    script.write_text(CLI_IN_PROCESS)
    args = [a if a != "all" else "caption" for a in RANK_ARGS]
    runs = {"ok": ["mask-eval", *args, "--data", held_out, "--rankings", str(out / "1"), "--methods", "hones",
                   "--top-ratio", "0.05", "--drop-overlapping"],
            "FileNotFoundError": ["rank", *args, "--data", str(tmp_path / "missing.json"), "--out",
                                  str(tmp_path / "never")]}
    for outcome, argv in runs.items():
        command = _command(2, *argv)
        i = len(command) - 1 - command[::-1].index("hones_core")
        command[i - 1:i + 1] = [str(script)]                      # the script instead of `-m hones_core`
        reports_dir = tmp_path / f"reports-{outcome}"
        reports_dir.mkdir()
        done = subprocess.run(command, cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT),
                                                      "HONES_REPORT_DIR": str(reports_dir)},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{outcome}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "terminate called" not in done.stderr, done.stderr[-3000:]
        reports = sorted((json.loads(path.read_text()) for path in reports_dir.glob("*.json")),
                         key=lambda r: r["rank"])
        assert [r["rank"] for r in reports] == [0, 1], done.stdout[-3000:]
        for r in reports:
            assert r["outcome"] == outcome, r
            assert "pt_gloo_runloop" in r["during"], r          # the check below sees gloo's threads
            assert r["after"] == [] and not r["initialized"], r  # group destroyed, its threads joined


def test_shutdown_without_a_group_does_nothing():
    assert not torch.distributed.is_initialized()
    distributed.shutdown()
    distributed.shutdown(wait=False)
    assert not torch.distributed.is_initialized()


def test_batches_are_dealt_round_robin_and_cover_every_row():
    for n, size, count in [(10, 3, 2), (7, 4, 3), (2, 4, 3), (0, 4, 2)]:
        shards = [Shard(i, count) for i in range(count)]
        dealt = [b for s in shards for b in s.batches(n, size)]
        assert sorted(i for b in dealt for i in b) == list(range(n))
        assert sorted((b.start, b.stop) for b in dealt) == [(b.start, b.stop) for b in Shard().batches(n, size)]
        for s in shards:
            assert all(b.start // size % count == s.index for b in s.batches(n, size))
    with pytest.raises(ValueError, match="not a valid shard"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="at least 1"):
        Shard().batches(4, 0)


def test_metric_statistics_of_parts_add_up_to_the_whole_split():
    hyps = ["a red circle on the left", "two blue squares", "a green triangle at the top", "nothing here"]
    refs = [["a red circle on the left side"], ["two blue squares"], ["a green triangle near the top"],
            ["a yellow star"]]
    parts = [metrics.statistics("bleu4", hyps[:1], refs[:1]), metrics.statistics("bleu4", hyps[1:], refs[1:])]
    summed = [a + b for a, b in zip(*parts)]
    assert metrics.from_statistics("bleu4", summed) == pytest.approx(metrics.corpus_bleu(hyps, refs), abs=1e-12)
    # BLEU of the parts averaged is not the corpus BLEU: averaging shards would be wrong
    assert (metrics.from_statistics("bleu4", parts[0]) + metrics.from_statistics("bleu4", parts[1])) / 2 != \
        pytest.approx(metrics.corpus_bleu(hyps, refs), abs=1e-3)
    vqa = [("2", ["2"]), ("red", ["blue"]), ("left", ["left"])]
    stats = [metrics.statistics("vqa_accuracy", [p], [r]) for p, r in vqa]
    total = [sum(col) for col in zip(*stats)]
    assert metrics.from_statistics("vqa_accuracy", total) == pytest.approx(2 / 3)
    ndcg = metrics.statistics("ndcg@5", [[0.1, 0.9, 0.2], [0.5, 0.4, 0.3]], [1, 2])
    assert metrics.from_statistics("ndcg@5", ndcg) == pytest.approx((1 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="no predictions"):
        metrics.from_statistics("anls", [0.0, 0.0])
    with pytest.raises(ValueError, match="10 entries"):
        metrics.from_statistics("bleu4", [1.0, 2.0])


def test_one_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    shard = distributed.current()
    assert (shard.index, shard.count, shard.is_main, shard.distributed) == (0, 1, True, False)
    x = torch.arange(3, dtype=torch.float32)
    assert torch.equal(shard.sum(x), x.double())
    assert distributed.device_placement(shard, device="cpu", device_map=None, gpus_per_process=None) == \
        {"device": "cpu"}


def test_placement_errors_name_the_fix():
    two = Shard(1, 2, device="cpu")
    assert distributed.device_placement(two, device=None, device_map=None, gpus_per_process=None) == {"device": "cpu"}
    with pytest.raises(ValueError, match="only applies with --device-map auto"):
        distributed.device_placement(two, device=None, device_map=None, gpus_per_process=2)
    with pytest.raises(ValueError, match="either --device or --device-map"):
        distributed.device_placement(Shard(), device="cpu", device_map="auto", gpus_per_process=None)
    with pytest.raises(ValueError, match="takes 'auto'"):
        distributed.device_placement(Shard(), device=None, device_map="balanced", gpus_per_process=None)
    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match="needs GPUs"):
            distributed.device_placement(two, device=None, device_map="auto", gpus_per_process=1)
        assert distributed.device_placement(Shard(), device=None, device_map="auto", gpus_per_process=None) == \
            {"device_map": "auto"}


def test_device_map_auto_loads_the_toy_vlm_on_cpu(toy_vlm, toy_items):
    from hones_core.models import load_vlm

    vlm = load_vlm(TOY, device_map="auto", max_memory=None)
    assert {p.device.type for p in vlm.model.parameters()} == {"cpu"}
    items = toy_items("caption")[:2]
    images, prompts = [i.load_image() for i in items], [i.prompt for i in items]
    assert vlm.generate(images, prompts) == toy_vlm.generate(images, prompts)
    with pytest.raises(ValueError, match="either device or device_map"):
        load_vlm(TOY, device="cpu", device_map="auto")
