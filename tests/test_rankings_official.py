"""Importing the official HONES release's output files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hones_core import rankings as R
from hones_core.rankings import ModelInfo, Rankings, RankingsNotFoundError, RankingsSchemaError

from conftest import assert_same


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
