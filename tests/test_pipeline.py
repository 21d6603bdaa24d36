"""The rank run end to end on the toy VLM: artifact contents, and resuming after a kill."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hones_core import rankings
from hones_core.pipeline import ProgressMismatchError, RankParams, rank


ASSETS = Path(__file__).resolve().parents[1] / "assets"


class Killed(Exception):
    pass


def _rank(vlm, items, out, params, **kwargs):
    return rank(vlm, {"vqa": items}, out, data_file="toy.json", params=params, show_progress=False, **kwargs)


def test_rank_writes_an_artifact_and_a_killed_run_resumes_to_the_same_one(toy_vlm, toy_items, tmp_path,
                                                                          monkeypatch):
    items = toy_items("vqa")[:6]
    params = RankParams(utility="logprob", top_heads=3, batch_size=8)
    whole = _rank(toy_vlm, items, tmp_path / "whole", params)
    ranking = whole.tasks["vqa"]
    assert ranking.head_scores.shape == (toy_vlm.arch.num_layers, toy_vlm.arch.num_heads)
    assert len(ranking.top_heads) == 3
    loaded = rankings.load(tmp_path / "whole")
    assert torch.equal(loaded.tasks["vqa"].importance, ranking.importance)
    assert not (tmp_path / "whole" / ".progress").exists()

    # kill the run right after the second DVP pass's sums are written, before it is recorded
    import hones_core.pipeline as pipeline
    original = pipeline.Progress.save_sums
    calls = {"n": 0}

    def dying(self, task, index, sums):
        original(self, task, index, sums)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
    monkeypatch.setattr(pipeline.Progress, "save_sums", dying)
    with pytest.raises(Killed):
        _rank(toy_vlm, items, tmp_path / "resumed", params)
    state = json.loads((tmp_path / "resumed" / ".progress" / "state.json").read_text())
    assert len(state["tasks"]["vqa"]["heads"]) == toy_vlm.arch.num_layers and len(state["tasks"]["vqa"]["plans"]) == 1
    monkeypatch.setattr(pipeline.Progress, "save_sums", original)

    with pytest.raises(ProgressMismatchError, match="other arguments"):
        _rank(toy_vlm, items, tmp_path / "resumed", RankParams(utility="logprob", top_heads=2, batch_size=8))
    resumed = _rank(toy_vlm, items, tmp_path / "resumed", params)
    # bitwise: saved progress round-trips exactly (JSON floats, float64 safetensors) and the rest of the
    # run computes the very same batches as the whole run did
    for name in ("head_scores", "importance"):
        assert torch.equal(getattr(resumed.tasks["vqa"], name), getattr(ranking, name))
    assert torch.equal(resumed.tasks["vqa"].baselines["dvp"], ranking.baselines["dvp"])
    for file in ("vqa/heads.safetensors", "vqa/neurons.safetensors", "vqa/top.json"):
        assert (tmp_path / "resumed" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()
    # the stats file's metadata order is not fixed (safetensors keeps it in a hash map): compare what it holds
    a, b = rankings.load(tmp_path / "resumed").task("vqa").stats, rankings.load(tmp_path / "whole").task("vqa").stats
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("mean", "std", "mean_abs", "positive"))
    assert (a.items, a.position, a.data) == (b.items, b.position, b.data)


def _neurons_file(folder, task):
    from safetensors.torch import load_file

    return load_file(str(folder / task / "neurons.safetensors"))


def test_one_task_has_ap_and_ma_but_no_ape_and_says_why(toy_vlm, toy_items, tmp_path):
    ranking = _rank(toy_vlm, toy_items("vqa")[:4], tmp_path / "one", RankParams(utility="logprob", top_heads=2,
                                                                                 batch_size=4)).tasks["vqa"]
    stored = _neurons_file(tmp_path / "one", "vqa")
    assert set(stored) == {"importance", "activation", "dvp", "ap", "ma"}
    assert "ape" not in ranking.baselines and "APE not computed" in ranking.notes
    top = json.loads((tmp_path / "one" / "vqa" / "top.json").read_text())
    assert "APE not computed" in top["notes"] and "ocr, caption, retrieval" in top["notes"]


def test_all_four_tasks_store_ape_from_their_ap(toy_vlm, toy_items, tmp_path):
    tasks = ["vqa", "ocr", "caption", "retrieval"]
    params = RankParams(utility="logprob", top_heads=2, batch_size=4)
    rank(toy_vlm, {t: toy_items(t)[:3] for t in tasks}, tmp_path / "all", data_file="toy.json", params=params,
         show_progress=False)
    loaded = rankings.load(tmp_path / "all")
    stored = {t: _neurons_file(tmp_path / "all", t) for t in tasks}
    L, I = toy_vlm.arch.num_layers, toy_vlm.arch.intermediate_size
    floor = torch.tensor(-(math.log(4) + 1)).item()
    for t in tasks:
        assert set(stored[t]) == {"importance", "activation", "dvp", "ap", "ma", "ape"}
        assert "APE" not in loaded.tasks[t].notes and "ape" in loaded.tasks[t].methods()
        assert len(loaded.tasks[t].select("ape", 0.01)) >= 1
    # APE by a plain loop over neurons, from the stored AP of the four tasks
    for layer in range(L):
        for i in range(I):
            column = [float(stored[t]["ap"][layer, i]) for t in tasks]
            total = sum(column)
            entropy = -sum(a / total * math.log(a / total) for a in column if a > 0) if total else 0.0
            for t, a in zip(tasks, column):
                expected = -entropy if total and a == max(column) else floor
                assert float(stored[t]["ape"][layer, i]) == pytest.approx(expected, abs=1e-6), (t, layer, i)
    # every neuron is scored by the task(s) where its AP is highest, and by no other
    assert all(int((stored[t]["ape"] > floor).sum()) > 0 for t in tasks)


def test_progress_of_an_older_version_without_token_sums_is_recomputed(toy_vlm, toy_items, tmp_path, monkeypatch):
    """Sums saved without the AP / MA token sums (an older version): the base plan runs again."""
    import hones_core.pipeline as pipeline

    items = toy_items("vqa")[:4]
    params = RankParams(utility="logprob", top_heads=2, batch_size=4)
    whole = _rank(toy_vlm, items, tmp_path / "whole", params).tasks["vqa"]
    original = pipeline.Progress.save_sums

    def old_format(self, task, index, sums):
        original(self, task, index, pipeline.Sums(sums.contributions, sums.abs_activation, sums.n))
        raise Killed()                     # killed right after the first (base) plan is written
    monkeypatch.setattr(pipeline.Progress, "save_sums", old_format)
    with pytest.raises(Killed):
        _rank(toy_vlm, items, tmp_path / "old", params)
    monkeypatch.setattr(pipeline.Progress, "save_sums", original)
    progress = pipeline.Progress(tmp_path / "old", json.loads((tmp_path / "old" / ".progress" / "state.json")
                                                              .read_text())["fingerprint"])
    progress.task("vqa")["plans"].append(0)              # as if the old version had recorded it
    progress.save(progress.state["arguments"])
    assert not progress.load_sums("vqa")[0].has_token_stats
    resumed = _rank(toy_vlm, items, tmp_path / "old", params).tasks["vqa"]
    for name in ("ap", "ma", "dvp", "activation"):
        assert torch.equal(resumed.baselines[name], whole.baselines[name]), name
    assert torch.equal(resumed.importance, whole.importance)


def test_mask_eval_names_the_available_methods(toy_world, tmp_path):
    from hones_core import cli
    from hones_core.errors import RankingsError

    toy = ASSETS / "toy-vlm"
    data = str(toy_world / "discovery.json")
    common = ["--model", str(toy), "--device", "cpu", "--data", data, "--task", "vqa", "--limit", "3",
              "--batch-size", "4", "--n-negatives", "4"]
    cli.main(["rank", *common, "--out", str(tmp_path / "r"), "--top-heads", "2", "--utility", "logprob"])
    # masking is measured on held-out images: the discovery split itself is refused
    with pytest.raises(ValueError, match=r"discovery.json shares 3 image\(s\) with the discovery split"):
        cli.main(["mask-eval", *common, "--rankings", str(tmp_path / "r"), "--methods", "hones"])
    with pytest.raises(ValueError, match=r"--drop-overlapping: every vqa item of .*discovery.json shows a discovery"):
        cli.main(["mask-eval", *common, "--rankings", str(tmp_path / "r"), "--methods", "hones",
                  "--drop-overlapping"])
    # from the command line: one paragraph on stderr and exit code 2, no traceback
    done = subprocess.run([sys.executable, "-m", "hones_core", "mask-eval", *common, "--rankings",
                           str(tmp_path / "r"), "--methods", "hones"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m hones_core: ") and "shares 3 image(s)" in last
    common[common.index(data)] = str(toy_world / "test.json")
    with pytest.raises(RankingsError, match=r"--methods ape,nope: not in the 'vqa' rankings; available: ") as err:
        cli.main(["mask-eval", *common, "--rankings", str(tmp_path / "r"), "--methods", "hones,ap,ape,nope"])
    available = str(err.value).split("available: ")[1].split(" (")[0].split(", ")
    assert sorted(available) == sorted(["hones", "activation", "dvp", "ap", "ma", "random"])
    assert "(ape is stored only by a rank run over all four tasks: --task all)" in str(err.value)
    out = tmp_path / "eval.json"
    cli.main(["mask-eval", *common, "--rankings", str(tmp_path / "r"), "--methods", "ap,ma", "--top-ratio", "0.05",
              "--json", str(out)])
    assert set(json.loads(out.read_text())["tasks"]["vqa"]) == {"ap", "ma"}


def _stats_by_hand(vlm, items):
    """z at the last prompt position of each item run alone (a plain hook on every down_proj), as numpy [n, L, I]."""
    import numpy as np

    seen = {}
    hooks = [layer.down_proj.register_forward_pre_hook(
        lambda module, args, index=layer.index: seen.__setitem__(index, args[0][0, -1].double().numpy().copy()))
        for layer in vlm.arch.layers]
    try:
        rows = []
        for item in items:
            with torch.inference_mode():
                vlm.last_hidden(vlm.encode([item.load_image()], [item.prompt]).inputs, use_cache=False)
            rows.append(np.stack([seen[l] for l in range(vlm.arch.num_layers)]))
    finally:
        for hook in hooks:
            hook.remove()
    return np.stack(rows)


def test_rank_stores_discovery_stats_and_add_stats_adds_them_to_an_artifact_without(toy_vlm, toy_items, toy_world,
                                                                                    tmp_path):
    import numpy as np

    from hones_core import cli
    from hones_core.errors import RankingsMismatchError
    from hones_core.pipeline import add_stats

    items = toy_items("vqa")[:4]
    data = str(toy_world / "discovery.json")
    params = RankParams(utility="logprob", top_heads=2, batch_size=4, limit=4)
    out = tmp_path / "art"
    stats = rank(toy_vlm, {"vqa": items}, out, data_file=data, params=params, show_progress=False).tasks["vqa"].stats
    assert (stats.items, stats.position, stats.data) == (4, "last_prompt", {"file": "discovery.json", "items": 4})
    # against each item run alone; float32 activations of a batch of 4 vs batch 1: agree to ~1e-6 relative
    z = _stats_by_hand(toy_vlm, items)                                             # [4, L, I]
    scale = float(np.abs(z).max())
    for name, expected in (("mean", z.mean(0)), ("std", z.std(0)), ("mean_abs", np.abs(z).mean(0))):
        assert np.abs(getattr(stats, name).numpy() - expected).max() <= 1e-5 * scale, name
    # P(z > 0) counts items: only a z within rounding of 0 could flip sign between the two runs
    sure = (np.abs(z) > 1e-3).all(0)                                               # [L, I]
    assert sure.mean() > 0.95
    assert np.array_equal(stats.positive.numpy()[sure], (z > 0).mean(0).astype(np.float32)[sure])
    assert torch.equal(rankings.load(out).task("vqa").stats.mean, stats.mean)

    # an artifact from before stats existed: it loads, and add_stats computes the same (same batches: bitwise)
    (out / "vqa" / "stats.safetensors").unlink()
    assert rankings.load(out).task("vqa").stats is None
    added = add_stats(toy_vlm, {"vqa": items}, out, data_file=data, batch_size=4, show_progress=False)["vqa"]
    for name in ("mean", "std", "mean_abs", "positive"):
        assert torch.equal(getattr(added, name), getattr(stats, name)), name
    assert torch.equal(rankings.load(out).task("vqa").stats.std, stats.std)
    with pytest.raises(RankingsMismatchError, match=r"not the split.*vqa: 4 image\(s\) that are not in the discovery"):
        add_stats(toy_vlm, {"vqa": toy_items("vqa")[8:12]}, out, data_file=data, show_progress=False)
    with pytest.raises(RankingsMismatchError, match="vqa: 5 items here, 4 when ranked"):
        add_stats(toy_vlm, {"vqa": toy_items("vqa")[:5]}, out, data_file=data, show_progress=False)

    # the CLI takes --limit (and seed, negatives) from the manifest when not given
    (out / "vqa" / "stats.safetensors").unlink()
    cli.main(["stats", "--model", str(ASSETS / "toy-vlm"), "--rankings", str(out), "--data", data, "--task", "vqa",
              "--device", "cpu", "--batch-size", "4"])
    assert torch.equal(rankings.load(out).task("vqa").stats.mean, stats.mean)
