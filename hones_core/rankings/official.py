"""Importing the output files of the official HONES release as a `TaskRanking`.

The release writes, per task, `heads.json`, `head_scores.npy`, `neuron_importance.npy` and
`neurons_top1pct.json`; `import_official` reads them (numpy files with `allow_pickle=False`,
so a crafted file cannot run code) and cross-checks them against each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import RankingsSchemaError
from ..files import read_json
from ..tasks import TASKS
from .schema import ModelInfo, TaskRanking
from .store import existing_dir

OFFICIAL_FILES = ("heads.json", "head_scores.npy", "neuron_importance.npy", "neurons_top1pct.json")


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RankingsSchemaError(f"{path} is not a plain numpy array file: {e}") from e
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise RankingsSchemaError(f"{path} must hold a float array, got {getattr(array, 'dtype', type(array))}")
    if not np.isfinite(array).all():
        raise RankingsSchemaError(f"{path} has NaN or infinite entries")
    return array


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * (1.0 + abs(a) + abs(b))


def _read_top_heads(heads_path: Path, head_scores: np.ndarray) -> tuple[dict, list[tuple[int, int]], bool]:
    """heads.json, its top heads checked against head_scores.npy: (document, top heads, any scored > 0)."""
    L, H = head_scores.shape
    heads = read_json(heads_path, shown=str(heads_path), error=RankingsSchemaError)
    if not isinstance(heads, dict) or not isinstance(heads.get("top_heads"), list):
        raise RankingsSchemaError(f"{heads_path} must be an object with a 'top_heads' list")
    top_heads: list[tuple[int, int]] = []
    positive = False
    for entry in heads["top_heads"]:
        try:
            layer, head, score = int(entry["layer"]), int(entry["head"]), float(entry["score"])
        except (KeyError, TypeError, ValueError) as e:
            raise RankingsSchemaError(f"{heads_path}: malformed top head {entry!r} ({e!r})") from e
        if not (0 <= layer < L and 0 <= head < H):
            raise RankingsSchemaError(f"{heads_path}: top head ({layer}, {head}) is outside {L} layers x {H} heads")
        if not _close(score, float(head_scores[layer, head])):
            raise RankingsSchemaError(f"{heads_path}: head ({layer}, {head}) scores {score} but head_scores.npy "
                                      f"has {float(head_scores[layer, head])} — the files come from different runs")
        top_heads.append((layer, head))
        positive |= score > 0
    return heads, top_heads, positive


def _check_top_neurons(top_path: Path, importance: np.ndarray) -> int:
    """neurons_top1pct.json checked against neuron_importance.npy; returns how many neurons it lists."""
    L, I = importance.shape
    top = read_json(top_path, shown=str(top_path), error=RankingsSchemaError)
    if not isinstance(top, list) or not top:
        raise RankingsSchemaError(f"{top_path} must be a non-empty list of neurons")
    try:
        listed = [(int(n["layer"]), int(n["neuron"]), float(n["score"])) for n in top]
    except (KeyError, TypeError, ValueError) as e:
        raise RankingsSchemaError(f"{top_path}: malformed entry ({e!r})") from e
    # The release picks the top k with argpartition, so among ties any may be listed: check
    # each listed neuron is in range, has its matrix score, and is not below the k-th best.
    kth = float(np.sort(importance.reshape(-1))[::-1][len(listed) - 1])
    for layer, neuron, score in listed:
        if not (0 <= layer < L and 0 <= neuron < I):
            raise RankingsSchemaError(f"{top_path}: neuron ({layer}, {neuron}) is outside {L} layers x {I} neurons")
        value = float(importance[layer, neuron])
        if not _close(score, value) or value < kth and not _close(value, kth):
            raise RankingsSchemaError(f"{top_path}: neuron ({layer}, {neuron}) with score {score} is not in the top "
                                      f"{len(listed)} of neuron_importance.npy — the files come from different runs")
    return len(listed)


def import_official(files_dir: str | Path, *, task: str, model: ModelInfo) -> TaskRanking:
    """Convert the official HONES release's output files for one task into a `TaskRanking`.

    The release writes, per task, `heads.json` ({"baseline", "all_heads", "top_heads": [{"layer",
    "head", "score", ...}]}), `head_scores.npy` ([layers, heads]), `neuron_importance.npy`
    ([layers, intermediate]) and `neurons_top1pct.json` ([{"rank", "layer", "neuron",
    "score", "global_index"}]). Numpy files are read with `allow_pickle=False`. The files are
    cross-checked: the top heads' scores against the head matrix, the top-neuron list against
    the importance matrix.

    Args:
        files_dir: the official run's output folder.
        task: which task it ranked.
        model: the model it ran on (shapes are checked against it).

    Raises:
        RankingsNotFoundError: no folder at `files_dir`.
        RankingsSchemaError: a file is missing, malformed, of the wrong shape, or disagrees with
            the others (the message names it).
    """
    directory = existing_dir(Path(files_dir))
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    missing = [name for name in OFFICIAL_FILES if not (directory / name).is_file()]
    if missing:
        raise RankingsSchemaError(f"{directory} lacks {', '.join(missing)} of the official output "
                                  f"({', '.join(OFFICIAL_FILES)}): run the official localization with --stage all")
    L, H, I = model.num_layers, model.num_heads, model.intermediate_size

    head_scores = _load_npy(directory / "head_scores.npy")
    if head_scores.shape != (L, H):
        raise RankingsSchemaError(f"{directory / 'head_scores.npy'} has shape {list(head_scores.shape)}; "
                                  f"{model.describe()} needs [{L}, {H}] (layers, heads)")
    importance = _load_npy(directory / "neuron_importance.npy")
    if importance.shape != (L, I):
        raise RankingsSchemaError(f"{directory / 'neuron_importance.npy'} has shape {list(importance.shape)}; "
                                  f"{model.describe()} needs [{L}, {I}] (layers, intermediate size)")
    heads, top_heads, positive = _read_top_heads(directory / "heads.json", head_scores)
    listed = _check_top_neurons(directory / "neurons_top1pct.json", importance)

    baseline = heads.get("baseline") if isinstance(heads.get("baseline"), dict) else {}
    notes = [f"imported from the official HONES release output ({len(top_heads)} top heads, "
             f"{listed} top neurons = {100 * listed / (L * I):.3g} %)"]
    if "metric" in baseline:
        notes.append(f"base {baseline.get('metric_name', 'utility')} {baseline['metric']}")
    if not positive:
        notes.append("no top head had a positive score, so the importance is the unconditioned DVP")
    return TaskRanking(task=task, head_scores=torch.from_numpy(head_scores.astype(np.float32)),
                       importance=torch.from_numpy(importance.astype(np.float32)), top_heads=top_heads,
                       fallback=not positive, notes="; ".join(notes))


__all__ = ["OFFICIAL_FILES", "import_official"]
