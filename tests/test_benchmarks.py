"""The benchmarks outside the library: their entry points, the CLI aliases, and the library not importing them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.app
import benchmarks.rank
from hones_core import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_does_not_import_benchmarks():
    code = ("import sys, hones_core, hones_core.cli, hones_core.steering, hones_core.testing; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'benchmarks'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command, module, call", [("bench-rank", benchmarks.rank, "run"),
                                                   ("bench-app", benchmarks.app, "bench_app")])
def test_the_cli_alias_forwards_every_argument(command, module, call, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(module, call, lambda *args, **kwargs: seen.append((args, kwargs)) or {"ok": 1})
    argv = ["--model", "m", "--limit", "4"] if command == "bench-rank" else ["--repeats", "1", "--no-big"]
    assert cli.main([command, *argv]) == 0
    assert capsys.readouterr().out == '{"ok": 1}\n'        # one JSON line, as `python -m benchmarks.<name>` prints
    assert module.main(argv) == 0 and capsys.readouterr().out == '{"ok": 1}\n'
    first, second = seen
    assert first == second
    if command == "bench-rank":
        args = first[0][0]
        assert (args.model, args.limit, args.task, args.batch_size, args.processes) == ("m", 4, "vqa", 64, None)
    else:
        assert first[1] == {"toy_model": None, "toy_rankings": None, "repeats": 1, "big_repeats": 3, "big": False,
                            "threads": None}


def test_the_alias_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench-rank", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m hones_core bench-rank") and "--processes-workdir" in text
    with pytest.raises(SystemExit) as exit_info:     # the benchmark's parser checks its options
        cli.main(["bench-app", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--model", "m", "--data", "d", "--task", "vqa", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m hones_core") and "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("command, module", sorted(cli.BENCHMARKS.items()))
def test_without_the_benchmarks_folder_the_alias_says_so(command, module, monkeypatch):
    monkeypatch.setitem(sys.modules, "benchmarks", None)     # import benchmarks -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    message = str(exit_info.value.code)
    assert "benchmarks/ folder of the repository" in message and f"python -m {module}" in message


def test_spearman():
    x = torch.tensor([0.1, 0.4, 0.2, 0.9])
    assert benchmarks.rank.spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert benchmarks.rank.spearman(x, -x) == pytest.approx(-1.0)
    assert benchmarks.rank.spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == \
        pytest.approx(0.8660254, rel=1e-6)    # tied ranks averaged: (0.5, 0.5, 2) vs (0, 1, 2)
    assert benchmarks.rank.spearman(torch.ones(3), torch.arange(3.0)) == 0.0


def test_one_process_is_a_plain_python_run():
    assert benchmarks.rank.launch_command(1, ["rank", "--out", "x"]) == [sys.executable, "-m", "hones_core", "rank",
                                                                       "--out", "x"]
    two = benchmarks.rank.launch_command(2, ["rank"])
    assert two[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and two[-3:] == ["-m", "hones_core", "rank"]


def test_bench_request_times_whole_requests_and_draws_input_free_figures_once(demo_service, examples):
    example = examples["vqa"][0]
    drawn = []
    original = demo_service.figure_cache.put
    demo_service.figure_cache.put = lambda key, value: drawn.append(key[0]) or original(key, value)
    try:
        result = benchmarks.app.bench_request(demo_service, example["image"], example["question"], repeats=2)
    finally:
        del demo_service.figure_cache.put
    assert set(result) == {"request_with_plots_s", "request_s", "sweep_s", "request_and_sweep_s"}
    assert all(value > 0 for value in result.values())
    assert result["request_and_sweep_s"] >= result["request_s"]
    # the first run drew head scores, layer spread and overlap; the two repeats drew none of them again
    assert sorted(drawn) == ["heads", "layers", "overlap"]


def test_the_projection_counts_passes_and_token_layers():
    # LLaVA-1.5-7B, one VQA item, 3 answer tokens (+ stop), no row departing; by hand:
    # reference: 1 + 32 x 32 = 1025 generations of 1 prefill + 4 steps, each 32 x (616 + 4) token-layers
    # ours: the base generation (5 passes) + its teacher-forced pass, then 1024 rows; token-layers:
    # 19 840 (base) + 32 x 619 (base pass) + 32 heads x (32 + 31 + ... + 1) layers x 619 tokens
    llava = benchmarks.rank.projection("vqa", answer_tokens=3, departed=0.0, items=1)["llava-1.5-7b"]
    assert llava["reference"] == {"passes": 5125, "token_layers": 20_336_000}
    assert llava["ours"] == {"passes": 6 + 1024, "token_layers": 19_840 + 19_808 + 32 * 528 * 619}
    assert llava["ratio_token_layers"] == round(20_336_000 / (19_840 + 19_808 + 32 * 528 * 619), 1)
    # every departing row adds one whole generation
    worse = benchmarks.rank.projection("vqa", answer_tokens=3, departed=0.5, items=1)["llava-1.5-7b"]
    assert worse["ours"]["passes"] == 6 + 1024 + 512 * 5
    qwen = benchmarks.rank.projection("retrieval", candidates=50, items=1)["qwen2.5-vl-7b"]
    assert qwen["reference"]["passes"] == (1 + 28 * 28) * 50 and "256 image tokens" in qwen["assumed"]["note"]


def test_bench_rank_reports_both_utilities_and_what_the_rows_did(toy_vlm, toy_items):
    out = benchmarks.rank.bench_rank(toy_vlm, toy_items("vqa")[:2], batch_size=16)
    for utility in ("metric", "logprob"):
        entry = out[utility]
        assert {"reference_s", "batched_s", "ratio", "max_abs_diff", "rows", "rows_verified", "rows_decoded",
                "near_tie_fallbacks"} <= set(entry)
        assert entry["rows"] == 2 * 16
    assert out["metric"]["max_abs_diff"] <= 1e-6 and out["logprob"]["max_abs_diff"] <= 2e-5
    assert out["metric"]["rows_verified"] + out["metric"]["rows_departed"] + out["metric"]["near_tie_fallbacks"] >= 32
    assert -1.0 <= out["spearman_metric_vs_logprob"] <= 1.0
    assert set(out["projection"]) == {"llava-1.5-7b", "qwen2.5-vl-7b"}
