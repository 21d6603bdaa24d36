"""The rankings artifact: selection, save/load, validation, Hub push/pull (local server), official import."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from hones_core import rankings as R
from hones_core.rankings import (ModelInfo, Rankings, RankingsError, RankingsMismatchError, RankingsNotFoundError,
                                 RankingsSchemaError, Scales, TaskRanking)

from hub_server import patch_client, start_hub

L, H, I = 3, 4, 50


def fake_arch(num_layers=L, num_heads=H, intermediate_size=I, family="llava"):
    return SimpleNamespace(family=SimpleNamespace(name=family), num_layers=num_layers, num_heads=num_heads,
                           intermediate_size=intermediate_size)


def make_task(task="vqa", seed=0, *, fallback=False, scales=None) -> TaskRanking:
    g = torch.Generator().manual_seed(seed)
    return TaskRanking(task=task, head_scores=torch.randn(L, H, generator=g), importance=torch.rand(L, I, generator=g),
                       top_heads=[(2, 1), (0, 3)], baselines={"activation": torch.rand(L, I, generator=g),
                                                              "dvp": torch.randn(L, I, generator=g)},
                       fallback=fallback, scales=scales, notes=f"notes of {task}")


def make_rankings(*tasks: str) -> Rankings:
    tasks = tasks or ("vqa", "caption")
    model = ModelInfo.from_arch(fake_arch(), id="llava-hf/llava-1.5-7b-hf", revision="abc123")
    return Rankings(model=model, tasks={t: make_task(t, seed=i, fallback=(t == "caption")) for i, t in enumerate(tasks)},
                    params={"top_heads": 2, "utility": "metric"}, data={"file": "disc.jsonl", "items": {"vqa": 8}},
                    created_with="hones_core test")


def assert_same(a: Rankings, b: Rankings) -> None:
    assert a.model == b.model
    assert list(a.tasks) == list(b.tasks)
    assert (a.params, a.data, a.created_with) == (b.params, b.data, b.created_with)
    for name in a.tasks:
        x, y = a.tasks[name], b.tasks[name]
        assert torch.equal(x.head_scores, y.head_scores) and torch.equal(x.importance, y.importance)
        assert x.top_heads == y.top_heads and x.fallback == y.fallback and x.notes == y.notes
        assert list(x.baselines) == list(y.baselines)
        assert all(torch.equal(x.baselines[k], y.baselines[k]) for k in x.baselines)
        assert (x.scales is None) == (y.scales is None)
        if x.scales is not None:
            assert torch.equal(x.scales.layers, y.scales.layers) and torch.equal(x.scales.neurons, y.scales.neurons)
            assert torch.equal(x.scales.scale, y.scales.scale) and x.scales.meta == y.scales.meta


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- selection


def hand_made(importance: torch.Tensor) -> TaskRanking:
    layers, width = importance.shape
    return TaskRanking(task="vqa", head_scores=torch.zeros(layers, 2), importance=importance, top_heads=[(0, 0)],
                       baselines={"dvp": -importance})


def test_select_exact_top_ratio():
    importance = torch.zeros(2, 10)
    importance[1, 7], importance[0, 2], importance[1, 0], importance[0, 9], importance[0, 4] = 9, 8, 7, 6, 5
    r = hand_made(importance)
    # 20 pairs: 10 % = 2 neurons, 25 % = 5 neurons, a tiny ratio still picks one.
    assert r.select("hones", 0.1) == {0: [2], 1: [7]}
    assert r.select("hones", 0.25) == {0: [2, 4, 9], 1: [0, 7]}
    assert r.select("hones", 1e-6) == {1: [7]}
    assert r.ranked("hones", 0.25) == [(1, 7, 9.0), (0, 2, 8.0), (1, 0, 7.0), (0, 9, 6.0), (0, 4, 5.0)]
    assert r.select("hones", 1.0) == {0: list(range(10)), 1: list(range(10))}
    # A baseline ranks by its own matrix: the most negative importance first (all zeros tie -> low index).
    assert r.select("dvp", 0.1) == {0: [0, 1]}
    assert r.methods() == ["hones", "dvp", "random"]


def test_select_breaks_ties_by_lower_flat_index():
    importance = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 3.0, 2.0, 0.0]])
    r = hand_made(importance)
    # Four entries tie at 3: flat indices 1, 2, 4, 5. A budget of 3 takes the first three.
    assert r.ranked("hones", 3 / 8) == [(0, 1, 3.0), (0, 2, 3.0), (1, 0, 3.0)]
    assert r.select("hones", 3 / 8) == {0: [1, 2], 1: [0]}


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -0.01, math.nan])
def test_select_rejects_budgets_outside_0_100_percent(ratio):
    r = make_task()
    for method in ("hones", "random", "dvp"):
        with pytest.raises(ValueError, match="the neuron budget must be between 0 % and 100 %"):
            r.select(method, ratio)
    with pytest.raises(ValueError, match="between 0 % and 100 %"):
        r.ranked("hones", ratio)


def test_unknown_method_lists_what_exists():
    r = make_task()
    with pytest.raises(ValueError, match="available: hones, activation, dvp, random"):
        r.matrix("gradient")
    with pytest.raises(ValueError, match="drawn at selection time"):
        r.matrix("random")
    assert torch.equal(r.matrix("hones"), r.importance) and torch.equal(r.matrix("dvp"), r.baselines["dvp"])


def test_random_selection_matches_hones_layer_counts_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(4, 500, generator=g)
    importance[2] += 1.0            # layer 2 dominates the HONES top
    r = hand_made(importance)
    hones = r.select("hones", 0.05)   # 100 neurons
    counts = {layer: len(v) for layer, v in hones.items()}
    assert sum(counts.values()) == 100 and counts == {2: 100}
    a, b, c = r.select("random", 0.05, seed=1), r.select("random", 0.05, seed=1), r.select("random", 0.05, seed=2)
    assert a == b and a != c
    assert {layer: len(v) for layer, v in a.items()} == counts == {layer: len(v) for layer, v in c.items()}
    expected = sorted(torch.randperm(500, generator=torch.Generator().manual_seed(1))[:100].tolist())
    assert a == {2: expected}
    # Spread over several layers: counts still follow HONES layer by layer.
    spread = hand_made(torch.rand(4, 500, generator=g))
    counts = {layer: len(v) for layer, v in spread.select("hones", 0.02).items()}
    drawn = spread.select("random", 0.02, seed=7)
    assert {layer: len(v) for layer, v in drawn.items()} == counts and len(counts) > 1
    assert all(len(set(v)) == len(v) and 0 <= min(v) and max(v) < 500 for v in drawn.values())


def test_task_ranking_checks_its_inputs():
    with pytest.raises(ValueError, match="task must be one of"):
        TaskRanking("detection", torch.zeros(L, H), torch.zeros(L, I), [])
    with pytest.raises(ValueError, match="outside head_scores"):
        TaskRanking("vqa", torch.zeros(L, H), torch.zeros(L, I), [(L, 0)])
    with pytest.raises(ValueError, match="baseline 'dvp' has shape"):
        TaskRanking("vqa", torch.zeros(L, H), torch.zeros(L, I), [], baselines={"dvp": torch.zeros(L, I + 1)})
    with pytest.raises(ValueError, match="cannot name a baseline"):
        TaskRanking("vqa", torch.zeros(L, H), torch.zeros(L, I), [], baselines={"random": torch.zeros(L, I)})
    with pytest.raises(ValueError, match="NaN"):
        TaskRanking("vqa", torch.zeros(L, H), torch.full((L, I), math.nan), [])
    converted = TaskRanking("vqa", torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, I, dtype=torch.float16), [])
    assert converted.head_scores.dtype == converted.importance.dtype == torch.float32


def test_rankings_task_names_what_is_available():
    artifact = make_rankings("vqa", "caption")
    assert artifact.task("vqa") is artifact.tasks["vqa"]
    with pytest.raises(RankingsError, match="rankings have no 'ocr' task; available: vqa, caption"):
        artifact.task("ocr")


def test_scales_multipliers_and_selection():
    s = Scales(layers=torch.tensor([2, 0, 2]), neurons=torch.tensor([9, 4, 1]), scale=torch.tensor([0.5, -0.25, 1.0]),
               meta={"method": "learned"})
    assert s.as_selection() == {0: [4], 2: [1, 9]}
    assert s.multipliers() == {0: ([4], [0.75]), 2: ([1, 9], [2.0, 1.5])}
    with pytest.raises(ValueError, match="more than once"):
        Scales(layers=torch.tensor([0, 0]), neurons=torch.tensor([1, 1]), scale=torch.zeros(2))
    with pytest.raises(ValueError, match="one layer and one neuron per scale"):
        Scales(layers=torch.tensor([0]), neurons=torch.tensor([1, 2]), scale=torch.zeros(2))


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    artifact = make_rankings("vqa", "caption")
    out = R.save(artifact, tmp_path / "art", figures={"figures/heads_vqa.png": "VQA head scores"})
    assert out == tmp_path / "art"
    assert all_files(out) == {"manifest.json", "README.md", *(f"{t}/{f}" for t in ("vqa", "caption")
                                                               for f in ("heads.safetensors", "neurons.safetensors",
                                                                         "top.json"))}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "hones-rankings/1" and manifest["tasks"] == ["vqa", "caption"]
    assert manifest["model"] == {"id": "llava-hf/llava-1.5-7b-hf", "revision": "abc123", "family": "llava",
                                 "num_layers": L, "num_heads": H, "intermediate_size": I}
    top = json.loads((out / "vqa" / "top.json").read_text())
    vqa = artifact.tasks["vqa"]
    # 1 % of 150 pairs rounds to 2 neurons.
    assert [(n["layer"], n["neuron"]) for n in top["ranked"]] == [(l, n) for l, n, _ in vqa.ranked("hones", 0.01)]
    assert len(top["ranked"]) == 2 and top["ratio"] == 0.01 and top["fallback"] is False
    assert top["top_heads"] == [{"layer": 2, "head": 1, "score": float(vqa.head_scores[2, 1])},
                                {"layer": 0, "head": 3, "score": float(vqa.head_scores[0, 3])}]
    loaded = R.load(out)
    assert_same(artifact, loaded)
    assert loaded.tasks["caption"].fallback is True and loaded.tasks["vqa"].fallback is False
    assert loaded.task("vqa").select("hones", 0.1) == vqa.select("hones", 0.1)


def test_save_task_and_scales_update_an_existing_artifact(tmp_path):
    out = R.save(make_rankings("vqa"), tmp_path / "art", figures={"fig/a.png": "A figure"})
    ocr = make_task("ocr", seed=5)
    assert R.save_task(out, ocr) == out / "ocr"
    assert json.loads((out / "manifest.json").read_text())["tasks"] == ["vqa", "ocr"]
    scales = Scales(layers=torch.tensor([0, 2, 2]), neurons=torch.tensor([3, 1, 40]),
                    scale=torch.tensor([0.25, -0.5, 1.25]), meta={"method": "learned", "task": "ocr",
                                                                  "settings": {"beta": 0.05, "epochs": 2}})
    assert R.save_scales(out, "ocr", scales) == out / "ocr" / "scales.safetensors"
    loaded = R.load(out)
    assert list(loaded.tasks) == ["vqa", "ocr"]
    got = loaded.task("ocr").scales
    assert torch.equal(got.layers, scales.layers) and torch.equal(got.neurons, scales.neurons)
    assert torch.equal(got.scale, scales.scale) and got.meta == scales.meta
    assert got.multipliers() == {0: ([3], [1.25]), 2: ([1, 40], [0.5, 2.25])}
    assert loaded.task("vqa").scales is None
    assert torch.equal(loaded.task("ocr").importance, ocr.importance)
    card = (out / "README.md").read_text()
    assert "| ocr |" in card and "3 neurons" in card and "![A figure](fig/a.png)" in card   # figures kept
    # Re-saving a task without scales drops the stale ones.
    R.save_task(out, make_task("ocr", seed=6))
    assert not (out / "ocr" / "scales.safetensors").exists() and R.load(out).task("ocr").scales is None
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # An artifact can start empty and grow task by task.
    empty = R.save(Rankings(model=make_rankings().model, tasks={}), tmp_path / "grow")
    R.save_task(empty, make_task("vqa"))
    assert list(R.load(empty).tasks) == ["vqa"]

    with pytest.raises(RankingsError, match="rankings have no 'caption' task; available: vqa, ocr"):
        R.save_scales(out, "caption", scales)
    with pytest.raises(RankingsMismatchError, match="outside"):
        R.save_scales(out, "ocr", Scales(layers=torch.tensor([L]), neurons=torch.tensor([0]), scale=torch.zeros(1)))
    wide = TaskRanking("caption", torch.zeros(L, H), torch.zeros(L, I + 1), [])
    with pytest.raises(RankingsMismatchError, match=rf"importance \[{L}, {I + 1}\] \(the model needs \[{L}, {I}\]\)"):
        R.save_task(out, wide)
    with pytest.raises(RankingsNotFoundError, match="no rankings folder"):
        R.save_task(tmp_path / "nowhere", ocr)


def test_writes_are_atomic(tmp_path, monkeypatch):
    out = R.save(make_rankings("vqa"), tmp_path / "art")
    before = {name: (out / name).read_bytes() for name in all_files(out)}
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError("disk full")
    monkeypatch.setattr(R.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        R.save(make_rankings("vqa", "caption"), out)
    monkeypatch.undo()
    assert calls   # it did try to write
    assert {name: (out / name).read_bytes() for name in all_files(out)} == before   # nothing half-written
    R.load(out)


def test_dataset_card(tmp_path):
    artifact = make_rankings("vqa", "caption")
    card = R.dataset_card(artifact, {"figures/overlap.png": "Cross-task overlap of the top 1 %"})
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"license": "mit", "pretty_name": "HONES rankings for llava-hf/llava-1.5-7b-hf",
                     "tags": ["hones", "interpretability", "vision-language"]}
    for text in ("llava-hf/llava-1.5-7b-hf", "`abc123`", "`llava`", f"{L} layers x {H} heads",
                 f"{I} FFN neurons", "| vqa | 2.1, 0.3 | 2 |", "yes: unconditioned DVP", "- top_heads: `2`",
                 "- file: `disc.jsonl`", '- items: `{"vqa": 8}`',
                 "![Cross-task overlap of the top 1 %](figures/overlap.png)"):
        assert text in card, text
    assert R.save(artifact, tmp_path / "a").joinpath("README.md").read_text() == R.dataset_card(artifact)


# --------------------------------------------------------------------------- validation


def test_check_against_names_both_sides():
    artifact = make_rankings("vqa")
    R.check_against(artifact, fake_arch())
    R.validate(artifact, num_layers=L, num_heads=H, intermediate_size=I)
    with pytest.raises(RankingsMismatchError) as e:
        R.check_against(artifact, fake_arch(num_layers=28), model_id="Qwen/Qwen2.5-VL-7B-Instruct")
    msg = str(e.value)
    assert f"rankings were made for {L} layers (llava-hf/llava-1.5-7b-hf@abc123); this model " \
           f"(Qwen/Qwen2.5-VL-7B-Instruct) has 28" in msg
    assert "use rankings computed for Qwen/Qwen2.5-VL-7B-Instruct" in msg
    with pytest.raises(RankingsMismatchError, match=rf"{H} heads per layer .*has 28"):
        R.check_against(artifact, fake_arch(num_heads=28))
    with pytest.raises(RankingsMismatchError, match=rf"{I} FFN neurons per layer .*has 18944"):
        R.validate(artifact, num_layers=L, num_heads=H, intermediate_size=18944)
    with pytest.raises(RankingsMismatchError, match="made for the 'llava' family .* is 'qwen2.5-vl'"):
        R.check_against(artifact, fake_arch(family="qwen2.5-vl"))
    with pytest.raises(RankingsMismatchError) as e:
        R.validate(artifact, num_layers=28, num_heads=28, intermediate_size=18944, model_id="Qwen/x")
    assert all(s in str(e.value) for s in (f"{L} layers", "has 28", f"{H} heads", f"{I} FFN", "has 18944"))


# --------------------------------------------------------------------------- schema errors


@pytest.fixture
def saved(tmp_path) -> Path:
    return R.save(make_rankings("vqa", "caption"), tmp_path / "art")


def test_missing_manifest(saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(RankingsSchemaError, match=r"art/manifest.json is missing"):
        R.load(saved)


def test_wrong_schema_string(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    (saved / "manifest.json").write_text(json.dumps({**manifest, "schema": "hones-rankings/2"}))
    with pytest.raises(RankingsSchemaError, match=r"manifest.json has schema 'hones-rankings/2'.*reads 'hones-rankings/1'"):
        R.load(saved)
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(RankingsSchemaError, match="manifest.json is not valid JSON"):
        R.load(saved)
    (saved / "manifest.json").write_text(json.dumps({**manifest, "model": {**manifest["model"], "num_heads": "4"}}))
    with pytest.raises(RankingsSchemaError, match="manifest.json: model.num_heads must be a int"):
        R.load(saved)


def test_missing_task_file(saved):
    (saved / "caption" / "neurons.safetensors").unlink()
    with pytest.raises(RankingsSchemaError, match=r"incomplete: .* caption/neurons.safetensors"):
        R.load(saved)


def test_wrong_shape_and_dtype(saved):
    heads = saved / "vqa" / "heads.safetensors"
    save_file({"head_scores": torch.zeros(L, H + 1)}, str(heads))
    with pytest.raises(RankingsSchemaError, match=rf"vqa/heads.safetensors: 'head_scores' has shape \[{L}, {H + 1}\], "
                                                  rf"expected \[{L}, {H}\]"):
        R.load(saved)
    save_file({"head_scores": torch.zeros(L, H, dtype=torch.float64)}, str(heads))
    with pytest.raises(RankingsSchemaError, match="vqa/heads.safetensors: 'head_scores' is torch.float64"):
        R.load(saved)
    save_file({"scores": torch.zeros(L, H)}, str(heads))
    with pytest.raises(RankingsSchemaError, match="vqa/heads.safetensors has no tensor 'head_scores'"):
        R.load(saved)
    heads.write_bytes(b"garbage")
    with pytest.raises(RankingsSchemaError, match="vqa/heads.safetensors is not a readable safetensors file"):
        R.load(saved)


def test_top_json_from_another_run_is_refused(saved):
    neurons = saved / "vqa" / "neurons.safetensors"
    save_file({"importance": torch.rand(L, I, generator=torch.Generator().manual_seed(99))}, str(neurons))
    with pytest.raises(RankingsSchemaError, match="vqa/top.json lists other neurons"):
        R.load(saved)


def test_not_found_paths(tmp_path):
    with pytest.raises(RankingsNotFoundError, match=r"no rankings folder at .*nope.*not a Hub repo id"):
        R.load(tmp_path / "nope")
    with pytest.raises(RankingsNotFoundError, match="not a Hub repo id"):
        R.load("runs/a/b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RankingsNotFoundError, match="is a file"):
        R.load(tmp_path / "file")


# --------------------------------------------------------------------------- Hub (local server)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    url, store, stop = start_hub()
    patch_client(monkeypatch, url, tmp_home=tmp_path / "hf-home")
    yield SimpleNamespace(url=url, store=store, stop=stop, cache=tmp_path / "hub-cache")
    stop()
    assert store.unhandled == []   # the client asked for nothing the server does not speak
    assert all(not path.startswith("http") for _, path in store.requests)


def test_push_then_load_from_the_hub(tmp_path, hub):
    artifact = make_rankings("vqa", "caption")
    folder = R.save(artifact, tmp_path / "art", figures={"figures/a.png": "A"})
    (folder / "figures").mkdir()
    (folder / "figures" / "a.png").write_bytes(b"\x89PNG fake")
    (folder / ".progress").mkdir()                       # leftovers a push must not upload
    (folder / ".progress" / "state.json").write_text("{}")
    (folder / "ocr").mkdir()                             # a task folder the manifest does not list
    (folder / "ocr" / "top.json").write_text("{}")
    first = R.push(folder, "org/hones-llava")
    assert first.oid and first.endswith(f"/datasets/org/hones-llava/commit/{first.oid}")
    files = hub.store.files("org/hones-llava")
    assert set(files) == {".gitattributes", "figures/a.png", *all_files(folder)} - {".progress/state.json",
                                                                                   "ocr/top.json"}
    assert files["vqa/neurons.safetensors"] == (folder / "vqa" / "neurons.safetensors").read_bytes()

    loaded = R.load("org/hones-llava", cache_dir=hub.cache)
    assert_same(artifact, loaded)
    downloaded = [path for method, path in hub.store.requests if method == "GET" and "/resolve/" in path]
    assert any(path.endswith("/vqa/neurons.safetensors") for path in downloaded)

    # A second commit adds a task; the first stays reachable by its sha.
    R.save_task(folder, make_task("ocr", seed=9))
    second = R.push(folder, "org/hones-llava", commit_message="add ocr")
    assert second.oid != first.oid and hub.store.repos["org/hones-llava"].messages[second.oid] == "add ocr"
    assert list(R.load("org/hones-llava", cache_dir=hub.cache).tasks) == ["vqa", "caption", "ocr"]
    pinned = R.load("org/hones-llava", revision=first.oid, cache_dir=hub.cache)
    assert_same(artifact, pinned)

    # Pushing the same folder again changes nothing and makes no commit.
    third = R.push(folder, "org/hones-llava")
    assert third.oid == second.oid

    # A branch, with one more task than main.
    R.save_task(folder, make_task("retrieval", seed=10))
    R.push(folder, "org/hones-llava", revision="experiments")
    assert list(R.load("org/hones-llava", revision="experiments", cache_dir=hub.cache).tasks) == [
        "vqa", "caption", "ocr", "retrieval"]
    assert list(R.load("org/hones-llava", cache_dir=hub.cache).tasks) == ["vqa", "caption", "ocr"]

    with pytest.raises(RankingsNotFoundError, match="no Hub dataset repo org/missing .*HF_TOKEN"):
        R.load("org/missing", cache_dir=hub.cache)
    with pytest.raises(RankingsNotFoundError, match="has no revision 'v9'"):
        R.load("org/hones-llava", revision="v9", cache_dir=hub.cache)

    # Offline: the server is gone, the cache answers; what was never downloaded fails clearly.
    hub.stop()
    from huggingface_hub import constants
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        assert list(R.load("org/hones-llava", cache_dir=hub.cache).tasks) == ["vqa", "caption", "ocr"]
        assert_same(artifact, R.load("org/hones-llava", revision=first.oid, cache_dir=hub.cache))
        with pytest.raises(RankingsNotFoundError, match=r"org/other is no local folder, and not in the Hub cache while offline mode is on"):
            R.load("org/other", cache_dir=hub.cache)
    # Online but unreachable, and not cached.
    with pytest.raises(RankingsNotFoundError, match="org/other is no local folder, and could not reach the Hub at http://127.0.0.1"):
        R.load("org/other", cache_dir=hub.cache)


def test_private_repo_needs_a_token(tmp_path, hub):
    hub.store.token = "hf_test_token"
    folder = R.save(make_rankings("vqa"), tmp_path / "art")
    R.push(folder, "org/private-ranks", token="hf_test_token", private=True)
    assert hub.store.repos["org/private-ranks"].private
    with pytest.raises(RankingsNotFoundError, match="private repo set HF_TOKEN"):
        R.load("org/private-ranks", cache_dir=hub.cache)
    assert list(R.load("org/private-ranks", cache_dir=hub.cache, token="hf_test_token").tasks) == ["vqa"]


def test_partial_snapshot_is_refused(tmp_path, hub):
    folder = R.save(make_rankings("vqa", "caption"), tmp_path / "art")
    repo = hub.store.create("org/partial")
    files = {name: (folder / name).read_bytes() for name in all_files(folder) if name != "caption/top.json"}
    repo.commit("main", files, "upload without caption/top.json")
    with pytest.raises(RankingsSchemaError, match=r"org/partial is incomplete: .*caption/top.json"):
        R.load("org/partial", cache_dir=hub.cache)


def test_push_refuses_an_invalid_folder(tmp_path, hub):
    folder = R.save(make_rankings("vqa"), tmp_path / "art")
    (folder / "vqa" / "top.json").unlink()
    with pytest.raises(RankingsSchemaError, match="vqa/top.json"):
        R.push(folder, "org/x")
    with pytest.raises(RankingsNotFoundError, match="no rankings folder"):
        R.push(tmp_path / "absent", "org/x")
    assert "org/x" not in hub.store.repos


# --------------------------------------------------------------------------- official release


def write_official(directory: Path, head_scores: np.ndarray, importance: np.ndarray, *, top_k_heads=3,
                   ratio=0.1) -> None:
    """The four files as the official `localize_heads` / `score_neurons` write them."""
    directory.mkdir(parents=True, exist_ok=True)
    layers, heads = head_scores.shape
    base = {"metric": 0.5, "metric_name": "vqa_accuracy"}
    rows = [{"layer": li, "head": hi, "score": float(head_scores[li, hi]), "baseline": 0.5,
             "intervened": 0.5 - float(head_scores[li, hi]), "metric_name": "vqa_accuracy"}
            for li in range(layers) for hi in range(heads)]
    rows = sorted(rows, key=lambda r: r["score"], reverse=True)
    top = [dict(r, rank=i + 1) for i, r in enumerate(rows[:top_k_heads])]
    np.save(directory / "head_scores.npy", head_scores.astype(np.float32))
    (directory / "heads.json").write_text(json.dumps({"baseline": base, "all_heads": rows, "top_heads": top},
                                                     indent=2))
    flat = importance.reshape(-1)
    k = max(1, int(round(flat.size * ratio)))
    idx = np.argpartition(flat, -k)[-k:]
    idx = idx[np.argsort(flat[idx])[::-1]]
    width = importance.shape[1]
    np.save(directory / "neuron_importance.npy", importance.astype(np.float32))
    (directory / "neurons_top1pct.json").write_text(json.dumps(
        [{"rank": r + 1, "layer": int(i // width), "neuron": int(i % width), "score": float(flat[i]),
          "global_index": int(i)} for r, i in enumerate(idx)], indent=2))


OFFICIAL_MODEL = ModelInfo(id="Qwen/Qwen2.5-VL-7B-Instruct", revision=None, family="qwen2.5-vl", num_layers=2,
                           num_heads=3, intermediate_size=10)


def test_import_official(tmp_path):
    head_scores = np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1]], dtype=np.float32)
    importance = np.arange(20, dtype=np.float32).reshape(2, 10) / 20
    write_official(tmp_path / "vqa", head_scores, importance)
    r = R.import_official(tmp_path / "vqa", task="vqa", model=OFFICIAL_MODEL)
    assert r.task == "vqa" and r.fallback is False
    assert r.top_heads == [(1, 0), (0, 0), (0, 2)]
    assert torch.equal(r.head_scores, torch.from_numpy(head_scores))
    assert torch.equal(r.importance, torch.from_numpy(importance))
    assert r.select("hones", 0.1) == {1: [8, 9]}
    assert "official HONES release" in r.notes and "vqa_accuracy 0.5" in r.notes
    # It becomes a normal artifact.
    artifact = Rankings(model=OFFICIAL_MODEL, tasks={"vqa": r}, params={"source": "official"})
    assert_same(artifact, R.load(R.save(artifact, tmp_path / "art")))


def test_import_official_fallback_and_errors(tmp_path):
    head_scores = -np.abs(np.random.default_rng(0).normal(size=(2, 3))).astype(np.float32)
    importance = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
    write_official(tmp_path / "ocr", head_scores, importance)
    r = R.import_official(tmp_path / "ocr", task="ocr", model=OFFICIAL_MODEL)
    assert r.fallback is True and "unconditioned DVP" in r.notes

    wide = ModelInfo(**{**OFFICIAL_MODEL.to_dict(), "intermediate_size": 11})
    with pytest.raises(RankingsSchemaError, match=r"neuron_importance.npy has shape \[2, 10\]; .* needs \[2, 11\]"):
        R.import_official(tmp_path / "ocr", task="ocr", model=wide)
    deep = ModelInfo(**{**OFFICIAL_MODEL.to_dict(), "num_layers": 3})
    with pytest.raises(RankingsSchemaError, match=r"head_scores.npy has shape \[2, 3\]"):
        R.import_official(tmp_path / "ocr", task="ocr", model=deep)

    # The top list of another run.
    write_official(tmp_path / "mixed", head_scores, importance)
    np.save(tmp_path / "mixed" / "neuron_importance.npy", importance[:, ::-1].copy())
    with pytest.raises(RankingsSchemaError, match="neurons_top1pct.json: neuron .* different runs"):
        R.import_official(tmp_path / "mixed", task="ocr", model=OFFICIAL_MODEL)

    # A pickled (object) array is refused without being unpickled.
    write_official(tmp_path / "pickled", head_scores, importance)
    np.save(tmp_path / "pickled" / "head_scores.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RankingsSchemaError, match="head_scores.npy is not a plain numpy array file"):
        R.import_official(tmp_path / "pickled", task="ocr", model=OFFICIAL_MODEL)

    (tmp_path / "ocr" / "heads.json").unlink()
    with pytest.raises(RankingsSchemaError, match=r"lacks heads.json"):
        R.import_official(tmp_path / "ocr", task="ocr", model=OFFICIAL_MODEL)
    with pytest.raises(RankingsNotFoundError):
        R.import_official(tmp_path / "absent", task="ocr", model=OFFICIAL_MODEL)


def test_cli_push_draws_the_card_figures(tmp_path, hub):
    from hones_core.cli import main

    folder = R.save(make_rankings("vqa", "ocr"), tmp_path / "art")
    assert main(["push", "--rankings", str(folder), "--repo-id", "org/with-figures"]) in (0, None)
    files = hub.store.files("org/with-figures")
    expected = {"figures/heads-vqa.png", "figures/heads-ocr.png", "figures/layers.png"}
    assert expected <= set(files)
    for name in expected:
        assert files[name].startswith(b"\x89PNG") and len(files[name]) > 2000
    card = files["README.md"].decode()
    for name in expected:
        assert f"]({name})" in card
    assert "Head scores S(l,h) for ocr" in card
    assert R.load("org/with-figures", cache_dir=hub.cache).tasks.keys() == {"vqa", "ocr"}
