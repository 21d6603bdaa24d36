"""Writing and reading a rankings artifact in a local folder, every file checked against the schema.

`save` writes a whole artifact, `save_task`, `save_scales` and `save_stats` update one; `read_dir` reads a
folder back into `Rankings` (shapes and dtypes checked against the manifest's model, the top
list against the matrices). Every file is written atomically (temp file in the same folder,
then `os.replace`), the manifest last. `write_scales` / `read_scales` handle a scales file on
its own (what `steer` writes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..errors import RankingsMismatchError, RankingsNotFoundError, RankingsSchemaError
from ..files import atomic_write, json_bytes, read_json
from ..tasks import TASKS
from .card import dataset_card, linked_figures
from .schema import (CARD_FILE, DEFAULT_RATIO, EVALUATION_FILE, HEADS_FILE, MANIFEST, NEURONS_FILE, SCALES_FILE,
                     SCHEMA, STATS_FILE, TOP_FILE, ModelInfo, NeuronStats, Rankings, Scales, TaskRanking,
                     check_task_shapes)


# --------------------------------------------------------------------------- writing


def _top_json(ranking: TaskRanking) -> dict:
    return {
        "ranked": [{"layer": layer, "neuron": neuron, "score": score}
                   for layer, neuron, score in ranking.ranked("hones", DEFAULT_RATIO)],
        "top_heads": [{"layer": layer, "head": head, "score": float(ranking.head_scores[layer, head])}
                      for layer, head in ranking.top_heads],
        "ratio": DEFAULT_RATIO,
        "fallback": ranking.fallback,
        "notes": ranking.notes,
    }


def _write_task(directory: Path, ranking: TaskRanking) -> None:
    task_dir = directory / ranking.task
    atomic_write(task_dir / HEADS_FILE, safetensors_bytes({"head_scores": ranking.head_scores}))
    atomic_write(task_dir / NEURONS_FILE, safetensors_bytes({"importance": ranking.importance, **ranking.baselines}))
    atomic_write(task_dir / TOP_FILE, json_bytes(_top_json(ranking)))
    if ranking.scales is not None:
        _write_scales(task_dir / SCALES_FILE, ranking.scales)
    elif (task_dir / SCALES_FILE).exists():
        (task_dir / SCALES_FILE).unlink()   # learned for an earlier ranking of this task: stale now
    if ranking.stats is not None:
        _write_stats(task_dir / STATS_FILE, ranking.stats)
    elif (task_dir / STATS_FILE).exists():
        (task_dir / STATS_FILE).unlink()    # measured for an earlier ranking of this task: stale now


def _write_stats(path: Path, stats: NeuronStats) -> None:
    metadata = {"items": str(stats.items), "position": stats.position, "data": json.dumps(stats.data)}
    atomic_write(path, safetensors_bytes({name: getattr(stats, name) for name in NeuronStats.FIELDS},
                                          metadata=metadata))


def _write_scales(path: Path, scales: Scales) -> None:
    metadata = {str(key): json.dumps(value) for key, value in scales.meta.items()}
    atomic_write(path, safetensors_bytes({"scale": scales.scale, "layer": scales.layers, "neuron": scales.neurons},
                                          metadata=metadata or None))


def write_scales(path: str | Path, scales: Scales) -> Path:
    """Write learned scales on their own, in the `<task>/scales.safetensors` format (atomically).

    `steer` writes its results this way; `save_scales` puts them into an artifact.
    """
    path = Path(path)
    _write_scales(path, scales)
    return path


def read_scales(path: str | Path, model: ModelInfo) -> Scales:
    """Read a scales file written by `write_scales` (or an artifact's), checked against `model`'s shapes.

    Raises:
        RankingsSchemaError: the file is missing, malformed, or indexes neurons `model` does not have.
    """
    path = Path(path)
    return _read_scales(path, str(path), model)


def _manifest(rankings: Rankings) -> dict:
    return {"schema": SCHEMA, "model": rankings.model.to_dict(), "tasks": list(rankings.tasks),
            "params": rankings.params, "data": rankings.data, "created_with": rankings.created_with}


def save(rankings: Rankings, path: str | Path, *, figures: Mapping[str, str] | None = None) -> Path:
    """Write the artifact folder (created if needed; other files in it are left alone).

    Args:
        rankings: what to write. Every task must fit `rankings.model`'s shapes.
        path: the artifact folder.
        figures: {PNG path relative to `path`: caption} to link from the dataset card
            (default: the figures the folder's current card links to).

    Returns:
        The folder.

    Raises:
        RankingsMismatchError: a task's tensors do not fit the model's shapes.
    """
    directory = Path(path)
    for ranking in rankings.tasks.values():
        check_task_shapes(rankings.model, ranking, "cannot save")
    json.dumps({"params": rankings.params, "data": rankings.data})   # not JSON-able: fail before writing
    directory.mkdir(parents=True, exist_ok=True)
    for ranking in rankings.tasks.values():
        _write_task(directory, ranking)
    if rankings.evaluation is not None:
        atomic_write(directory / EVALUATION_FILE, json_bytes(rankings.evaluation))
    figures = linked_figures(directory) if figures is None else figures
    atomic_write(directory / CARD_FILE, dataset_card(rankings, figures).encode())
    atomic_write(directory / MANIFEST, json_bytes(_manifest(rankings)))   # last: it commits the rest
    return directory


def save_evaluation(rankings_dir: str | Path, evaluation: Mapping) -> Path:
    """Store `mask-eval` results in an existing artifact as `evaluation.json` (the card shows them).

    Returns:
        The written file.

    Raises:
        RankingsNotFoundError: no folder at `rankings_dir`.
        RankingsSchemaError: the folder is not a valid artifact, or `evaluation` is not a JSON object.
    """
    directory = Path(rankings_dir)
    rankings = read_dir(existing_dir(directory), origin=str(directory))
    if not isinstance(evaluation, Mapping):
        raise RankingsSchemaError(f"an evaluation must be a JSON object, got {type(evaluation).__name__}")
    rankings.evaluation = dict(evaluation)
    path = directory / EVALUATION_FILE
    atomic_write(path, json_bytes(rankings.evaluation))
    atomic_write(directory / CARD_FILE, dataset_card(rankings, linked_figures(directory)).encode())
    return path


def save_task(rankings_dir: str | Path, task_ranking: TaskRanking) -> Path:
    """Add (or replace) one task of an existing artifact; the manifest lists it afterwards.

    Raises:
        RankingsNotFoundError: no folder at `rankings_dir`.
        RankingsSchemaError: the folder is not a valid artifact.
        RankingsMismatchError: the task does not fit the artifact's model.
    """
    directory = Path(rankings_dir)
    rankings = read_dir(existing_dir(directory), origin=str(directory))
    check_task_shapes(rankings.model, task_ranking, f"cannot add to {directory}")
    rankings.tasks[task_ranking.task] = task_ranking
    _write_task(directory, task_ranking)
    atomic_write(directory / CARD_FILE, dataset_card(rankings, linked_figures(directory)).encode())
    atomic_write(directory / MANIFEST, json_bytes(_manifest(rankings)))
    return directory / task_ranking.task


def save_scales(rankings_dir: str | Path, task: str, scales: Scales) -> Path:
    """Store learned scales for one task of an existing artifact.

    Returns:
        The written `<task>/scales.safetensors`.

    Raises:
        RankingsNotFoundError: no folder at `rankings_dir`.
        RankingsSchemaError: the folder is not a valid artifact.
        RankingsError: the artifact has no such task.
        RankingsMismatchError: a scale points outside the model's layers or neurons.
    """
    directory = Path(rankings_dir)
    rankings = read_dir(existing_dir(directory), origin=str(directory))
    ranking = rankings.task(task)
    model = rankings.model
    if len(scales) and (int(scales.layers.max()) >= model.num_layers
                        or int(scales.neurons.max()) >= model.intermediate_size):
        raise RankingsMismatchError(
            f"scales point at layer {int(scales.layers.max())} / neuron {int(scales.neurons.max())}, outside "
            f"{model.describe()} ({model.num_layers} layers x {model.intermediate_size} neurons) — "
            f"train scales on the model these rankings belong to")
    path = directory / task / SCALES_FILE
    _write_scales(path, scales)
    ranking.scales = scales
    atomic_write(directory / CARD_FILE, dataset_card(rankings, linked_figures(directory)).encode())
    return path


def save_stats(rankings_dir: str | Path, stats: Mapping[str, NeuronStats]) -> list[Path]:
    """Store per-neuron discovery statistics for tasks of an existing artifact (no re-ranking).

    Args:
        rankings_dir: the artifact folder.
        stats: task -> its `NeuronStats` (`activation_stats.discovery_stats`).

    Returns:
        The written `<task>/stats.safetensors` files.

    Raises:
        RankingsNotFoundError: no folder at `rankings_dir`.
        RankingsSchemaError: the folder is not a valid artifact.
        RankingsError: the artifact has no such task.
        RankingsMismatchError: the statistics do not have the model's [layers, intermediate] shape.
    """
    directory = Path(rankings_dir)
    rankings = read_dir(existing_dir(directory), origin=str(directory))
    model = rankings.model
    expected = (model.num_layers, model.intermediate_size)
    for task, task_stats in stats.items():
        rankings.task(task)
        if task_stats.shape != expected:
            raise RankingsMismatchError(
                f"{task} stats have shape {list(task_stats.shape)}, but {model.describe()} has {list(expected)} "
                f"[layers, intermediate] — compute them with the model these rankings belong to")
    written = []
    for task, task_stats in stats.items():
        path = directory / task / STATS_FILE
        _write_stats(path, task_stats)
        rankings.tasks[task].stats = task_stats
        written.append(path)
    atomic_write(directory / CARD_FILE, dataset_card(rankings, linked_figures(directory)).encode())
    return written


# --------------------------------------------------------------------------- reading


def existing_dir(directory: Path) -> Path:
    """`directory`, if it is one: what every reader of a local artifact checks first.

    Args:
        directory: the folder asked for.

    Returns:
        The same path.

    Raises:
        RankingsNotFoundError: nothing there, or a file (with `source` set to the path).
    """
    if not directory.exists():
        raise RankingsNotFoundError(f"no rankings folder at {directory} — check the path, or compute one with "
                                    f"`python -m hones_core rank --model <model> --data <file> --task all "
                                    f"--out {directory}`", source=str(directory))
    if not directory.is_dir():
        raise RankingsNotFoundError(f"{directory} is a file; a rankings artifact is a folder with {MANIFEST}",
                                    source=str(directory))
    return directory


def _read_tensors(path: Path, shown: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise RankingsSchemaError(f"{shown} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise RankingsSchemaError(f"{shown} is not a readable safetensors file: {e}") from e


def _expect(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype,
            shown: str) -> torch.Tensor:
    if key not in tensors:
        raise RankingsSchemaError(f"{shown} has no tensor {key!r} (it has: {', '.join(tensors) or 'none'})")
    t = tensors[key]
    if t.dtype != dtype:
        raise RankingsSchemaError(f"{shown}: {key!r} is {t.dtype}, expected {dtype}")
    if shape and tuple(t.shape) != shape:
        raise RankingsSchemaError(f"{shown}: {key!r} has shape {list(t.shape)}, expected {list(shape)} "
                                  f"(from {MANIFEST}'s model)")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise RankingsSchemaError(f"{shown}: {key!r} has NaN or infinite entries")
    return t


def _read_scales(path: Path, shown: str, model: ModelInfo) -> Scales:
    tensors, metadata = _read_tensors(path, shown)
    scale = _expect(tensors, "scale", (), torch.float32, shown)
    n = scale.numel()
    layers = _expect(tensors, "layer", (n,), torch.int64, shown)
    neurons = _expect(tensors, "neuron", (n,), torch.int64, shown)
    if scale.dim() != 1:
        raise RankingsSchemaError(f"{shown}: 'scale' must be 1-D, got shape {list(scale.shape)}")
    if n and (int(layers.min()) < 0 or int(layers.max()) >= model.num_layers
              or int(neurons.min()) < 0 or int(neurons.max()) >= model.intermediate_size):
        raise RankingsSchemaError(f"{shown}: indices outside {model.num_layers} layers x "
                                  f"{model.intermediate_size} neurons")
    try:
        meta = {key: json.loads(value) for key, value in metadata.items()}
    except json.JSONDecodeError as e:
        raise RankingsSchemaError(f"{shown}: metadata values must be JSON ({e})") from e
    try:
        return Scales(layers=layers, neurons=neurons, scale=scale, meta=meta)
    except ValueError as e:
        raise RankingsSchemaError(f"{shown}: {e}") from e


def _read_stats(path: Path, shown: str, model: ModelInfo) -> NeuronStats:
    tensors, metadata = _read_tensors(path, shown)
    shape = (model.num_layers, model.intermediate_size)
    values = {name: _expect(tensors, name, shape, torch.float32, shown) for name in NeuronStats.FIELDS}
    try:
        items = int(metadata["items"])
        data = json.loads(metadata.get("data", "{}"))
        position = metadata["position"]
    except (KeyError, ValueError) as e:    # json.JSONDecodeError is a ValueError
        raise RankingsSchemaError(f"{shown}: metadata must give 'items' (an integer), 'position' and 'data' "
                                  f"(JSON) ({e!r})") from e
    try:
        return NeuronStats(**values, items=items, position=position, data=data)
    except ValueError as e:
        raise RankingsSchemaError(f"{shown}: {e}") from e


def _read_task(directory: Path, task: str, model: ModelInfo, origin: str) -> TaskRanking:
    def shown(name: str) -> str:
        return f"{origin}/{task}/{name}"

    heads, _ = _read_tensors(directory / task / HEADS_FILE, shown(HEADS_FILE))
    head_scores = _expect(heads, "head_scores", (model.num_layers, model.num_heads), torch.float32,
                          shown(HEADS_FILE))
    neurons, _ = _read_tensors(directory / task / NEURONS_FILE, shown(NEURONS_FILE))
    shape = (model.num_layers, model.intermediate_size)
    importance = _expect(neurons, "importance", shape, torch.float32, shown(NEURONS_FILE))
    baselines = {name: _expect(neurons, name, shape, torch.float32, shown(NEURONS_FILE))
                 for name in neurons if name != "importance"}
    top = read_json(directory / task / TOP_FILE, shown=shown(TOP_FILE), error=RankingsSchemaError)
    if not isinstance(top, dict):
        raise RankingsSchemaError(f"{shown(TOP_FILE)} must hold an object")
    for key, kind in (("ranked", list), ("top_heads", list), ("fallback", bool), ("ratio", (int, float))):
        if not isinstance(top.get(key), kind):
            raise RankingsSchemaError(f"{shown(TOP_FILE)}: {key!r} is missing or of the wrong type")
    try:
        top_heads = [(int(h["layer"]), int(h["head"])) for h in top["top_heads"]]
        listed = {(int(n["layer"]), int(n["neuron"])) for n in top["ranked"]}
    except (KeyError, TypeError, ValueError) as e:
        raise RankingsSchemaError(f"{shown(TOP_FILE)}: malformed entry ({e!r})") from e
    scales = None
    if (directory / task / SCALES_FILE).exists():
        scales = _read_scales(directory / task / SCALES_FILE, shown(SCALES_FILE), model)
    stats = None       # optional: artifacts written before stats existed have none
    if (directory / task / STATS_FILE).exists():
        stats = _read_stats(directory / task / STATS_FILE, shown(STATS_FILE), model)
    try:
        ranking = TaskRanking(task=task, head_scores=head_scores, importance=importance, top_heads=top_heads,
                              baselines=baselines, fallback=top["fallback"], scales=scales,
                              notes=str(top.get("notes", "")), stats=stats)
    except ValueError as e:
        raise RankingsSchemaError(f"{origin}/{task}: {e}") from e
    try:
        expected = {(layer, neuron) for layer, neuron, _ in ranking.ranked("hones", top["ratio"])}
    except ValueError as e:
        raise RankingsSchemaError(f"{shown(TOP_FILE)}: {e}") from e
    if listed != expected:
        raise RankingsSchemaError(f"{shown(TOP_FILE)} lists other neurons than the top {top['ratio']} of "
                                  f"{shown(NEURONS_FILE)}: the two files come from different runs — re-save the task")
    return ranking


def read_dir(directory: Path, *, origin: str) -> Rankings:
    """Read an artifact folder into `Rankings`, checking every file against the schema.

    Args:
        directory: the artifact folder (a local one, or a Hub snapshot).
        origin: how the folder is named in messages (a path, or "org/name@revision").

    Returns:
        The `Rankings`, every task's tensors checked against the manifest's model shapes
        (`source` left None: the caller knows where it read them).

    Raises:
        RankingsSchemaError: a file is missing or malformed (the message names it).
    """
    manifest = read_json(directory / MANIFEST, shown=f"{origin}/{MANIFEST}", error=RankingsSchemaError)
    shown = f"{origin}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise RankingsSchemaError(f"{shown} must hold an object")
    if manifest.get("schema") != SCHEMA:
        raise RankingsSchemaError(f"{shown} has schema {manifest.get('schema')!r}; this hones_core "
                                  f"({__version__}) reads {SCHEMA!r} — upgrade hones_core or re-create the artifact")
    model = ModelInfo.from_dict(manifest.get("model"), source=shown)
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or len(set(map(str, tasks))) != len(tasks):
        raise RankingsSchemaError(f"{shown}: 'tasks' must be a list of distinct task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise RankingsSchemaError(f"{shown}: unknown task(s) {unknown}; tasks are {', '.join(TASKS)}")
    for key in ("params", "data"):
        if not isinstance(manifest.get(key, {}), dict):
            raise RankingsSchemaError(f"{shown}: {key!r} must be an object")
    # A partial download or copy must not pass silently: every listed task needs its files.
    missing = [f"{t}/{name}" for t in tasks for name in (HEADS_FILE, NEURONS_FILE, TOP_FILE)
               if not (directory / t / name).is_file()]
    if missing:
        raise RankingsSchemaError(f"{origin} is incomplete: {shown} lists tasks whose files are missing: "
                                  f"{', '.join(missing)}")
    evaluation = None
    if (directory / EVALUATION_FILE).is_file():
        evaluation = read_json(directory / EVALUATION_FILE, shown=f"{origin}/{EVALUATION_FILE}",
                               error=RankingsSchemaError)
        if not isinstance(evaluation, dict):
            raise RankingsSchemaError(f"{origin}/{EVALUATION_FILE} must hold an object")
    return Rankings(model=model, tasks={t: _read_task(directory, t, model, origin) for t in tasks},
                    params=manifest.get("params", {}), data=manifest.get("data", {}),
                    created_with=str(manifest.get("created_with", "")), evaluation=evaluation)


__all__ = ["save", "save_task", "save_scales", "save_stats", "save_evaluation", "write_scales", "read_scales",
           "read_dir", "existing_dir"]
