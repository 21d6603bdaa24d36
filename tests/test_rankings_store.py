"""The rankings artifact in a local folder: save/load round trip, updates, atomic writes, schema errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hones_core import rankings as R
from hones_core.rankings import (Rankings, RankingsError, RankingsMismatchError, RankingsNotFoundError,
                                 RankingsSchemaError, Scales, TaskRanking)

from conftest import RANKINGS_SHAPE, all_files, assert_same, make_rankings, make_task

L, H, I = RANKINGS_SHAPE


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
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        R.save(make_rankings("vqa", "caption"), out)
    monkeypatch.undo()
    assert calls   # it did try to write
    assert {name: (out / name).read_bytes() for name in all_files(out)} == before   # nothing half-written
    R.load(out)


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


def test_a_stored_evaluation_round_trips_and_shows_in_the_card(tmp_path):
    directory = R.save(make_rankings("vqa"), tmp_path / "art")
    assert R.load(directory).evaluation is None
    doc = {"split": {"file": "test.json", "digest": "abc", "items": {"vqa": 8}}, "methods": ["hones", "random"],
           "budgets_pct": [1.0, 2.0],
           "drops": {"vqa": {"hones": {"1": {"rel_drop": 27.25}, "2": {"rel_drop": 40.0}},
                             "random": {"1": {"rel_drop": 1.5}, "2": {"rel_drop": 2.0}}}},
           "cross": {"hones": {"tasks": ["vqa"], "matrix": [[27.25]], "specificity": None}}}
    path = R.save_evaluation(directory, doc)
    assert path == directory / "evaluation.json" and json.loads(path.read_text()) == doc
    assert R.load(directory).evaluation == doc
    card = (directory / "README.md").read_text()
    assert "## Stored evaluation" in card and "| task | hones | random |" in card and "| vqa | 27.2 | 1.5 |" in card
    # re-saving the artifact keeps it; a malformed file is refused with its name
    R.save(R.load(directory), directory)
    assert R.load(directory).evaluation == doc
    path.write_text("[1, 2]")
    with pytest.raises(RankingsSchemaError, match="evaluation.json must hold an object"):
        R.load(directory)


# --------------------------------------------------------------------------- discovery statistics


def make_stats(seed=0, shape=(L, I), items=7):
    g = torch.Generator().manual_seed(seed)
    return R.NeuronStats(mean=torch.randn(shape, generator=g), std=torch.rand(shape, generator=g),
                         mean_abs=torch.rand(shape, generator=g), positive=torch.rand(shape, generator=g),
                         items=items, data={"file": "disc.jsonl", "items": items})


def test_stats_round_trip_through_save_and_load(tmp_path):
    artifact = make_rankings("vqa", "caption")
    artifact.tasks["vqa"].stats = make_stats(seed=3)
    out = R.save(artifact, tmp_path / "art")
    assert (out / "vqa" / "stats.safetensors").is_file() and not (out / "caption" / "stats.safetensors").exists()
    loaded = R.load(out)
    got, want = loaded.task("vqa").stats, artifact.tasks["vqa"].stats
    for name in ("mean", "std", "mean_abs", "positive"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.items, got.position, got.data) == (7, "last_prompt", {"file": "disc.jsonl", "items": 7})
    assert got.of(1, 4) == {name: float(getattr(want, name)[1, 4]) for name in ("mean", "std", "mean_abs", "positive")}
    assert loaded.task("caption").stats is None
    card = (out / "README.md").read_text()
    assert "vqa (7 items)" in card and "Missing for caption" in card and "python -m hones_core stats" in card


def test_an_artifact_without_stats_loads_and_save_stats_adds_them(tmp_path):
    out = R.save(make_rankings("vqa", "caption"), tmp_path / "art", figures={"fig/a.png": "A figure"})
    before = R.load(out)
    assert all(r.stats is None for r in before.tasks.values())
    assert "none stored" in (out / "README.md").read_text()
    written = R.save_stats(out, {"vqa": make_stats(1), "caption": make_stats(2, items=3)})
    assert written == [out / "vqa" / "stats.safetensors", out / "caption" / "stats.safetensors"]
    after = R.load(out)
    assert torch.equal(after.task("caption").stats.mean, make_stats(2, items=3).mean)
    assert after.task("caption").stats.items == 3
    card = (out / "README.md").read_text()
    assert "vqa (7 items), caption (3 items)" in card and "![A figure](fig/a.png)" in card
    # the rest of the artifact is as it was
    for name in ("vqa", "caption"):
        assert torch.equal(after.task(name).importance, before.task(name).importance)
    with pytest.raises(RankingsError, match="no 'ocr' task"):
        R.save_stats(out, {"ocr": make_stats()})
    with pytest.raises(RankingsMismatchError, match=r"\[2, 50\].*\[3, 50\]"):
        R.save_stats(out, {"vqa": make_stats(shape=(2, I))})
    # re-saving a task without stats drops the stale file (measured for the earlier ranking)
    R.save_task(out, make_task("vqa", seed=9))
    assert not (out / "vqa" / "stats.safetensors").exists() and R.load(out).task("caption").stats is not None


def test_malformed_stats_files_are_refused(tmp_path):
    out = R.save(make_rankings("vqa"), tmp_path / "art")
    path = out / "vqa" / "stats.safetensors"
    good = {name: getattr(make_stats(), name) for name in ("mean", "std", "mean_abs", "positive")}
    meta = {"items": "7", "position": "last_prompt", "data": "{}"}
    save_file({**good, "std": torch.rand(L, I + 1)}, str(path), metadata=meta)
    with pytest.raises(RankingsSchemaError, match=r"stats.safetensors: 'std' has shape \[3, 51\]"):
        R.load(out)
    save_file({**good, "std": -torch.rand(L, I)}, str(path), metadata=meta)
    with pytest.raises(RankingsSchemaError, match="cannot be negative"):
        R.load(out)
    save_file(good, str(path), metadata={"position": "last_prompt"})
    with pytest.raises(RankingsSchemaError, match="'items'"):
        R.load(out)
    save_file({k: v for k, v in good.items() if k != "positive"}, str(path), metadata=meta)
    with pytest.raises(RankingsSchemaError, match="no tensor 'positive'"):
        R.load(out)
