"""The rankings artifact: head scores and neuron rankings of one model, per task (schema v1).

An artifact is a directory, and a Hub *dataset* repo with the same files:

    manifest.json               {"schema": "hones-rankings/1", "model": {...}, "tasks": [...],
                                 "params": {...}, "data": {...}, "created_with": "hones_core x.y"}
    <task>/heads.safetensors    "head_scores" [layers, heads] float32
    <task>/neurons.safetensors  "importance" [layers, intermediate] float32 (the HONES ranking)
                                + baseline matrices under their method names ("activation", "dvp")
    <task>/top.json             the top selection at the default ratio, the top heads, fallback, notes
    <task>/scales.safetensors   optional learned scales: "scale" [n] float32, "layer"/"neuron" [n] int64
    README.md                   dataset card

`save` writes one, `load` reads one from a folder or a Hub dataset repo (through the Hub
cache, so `HF_HUB_OFFLINE=1` works once downloaded), `check_against` refuses rankings of
another model, `push` uploads, and `import_official` converts the output files of the
official HONES release. Every file is written atomically (temp file in the same folder,
then `os.replace`), the manifest last.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from . import __version__
from .errors import RankingsError, RankingsMismatchError, RankingsNotFoundError, RankingsSchemaError
from .files import atomic_write, json_bytes, read_json
from .selection import Selection, budget, counts, from_flat, random_like, top_flat
from .tasks import TASKS

SCHEMA = "hones-rankings/1"
DEFAULT_RATIO = 0.01
RESERVED_METHODS = ("hones", "random")

MANIFEST = "manifest.json"
HEADS_FILE = "heads.safetensors"
NEURONS_FILE = "neurons.safetensors"
TOP_FILE = "top.json"
SCALES_FILE = "scales.safetensors"
CARD_FILE = "README.md"

OFFICIAL_FILES = ("heads.json", "head_scores.npy", "neuron_importance.npy", "neurons_top1pct.json")










# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ModelInfo:
    """Which model the rankings belong to, and the shapes they must fit."""
    id: str
    revision: str | None
    family: str
    num_layers: int
    num_heads: int
    intermediate_size: int

    @classmethod
    def from_arch(cls, arch: Any, *, id: str, revision: str | None) -> ModelInfo:
        """From a `hones_core.arch.Architecture` (anything with `.family.name`, `.num_layers`,
        `.num_heads`, `.intermediate_size`)."""
        return cls(id=id, revision=revision, family=arch.family.name, num_layers=int(arch.num_layers),
                   num_heads=int(arch.num_heads), intermediate_size=int(arch.intermediate_size))

    def to_dict(self) -> dict:
        return {"id": self.id, "revision": self.revision, "family": self.family, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "intermediate_size": self.intermediate_size}

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = MANIFEST) -> ModelInfo:
        """Raises `RankingsSchemaError` naming `source` if a field is missing or of the wrong type."""
        if not isinstance(d, Mapping):
            raise RankingsSchemaError(f"{source}: 'model' must be an object, got {type(d).__name__}")
        expected = {"id": str, "family": str, "num_layers": int, "num_heads": int, "intermediate_size": int}
        for key, kind in expected.items():
            value = d.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RankingsSchemaError(f"{source}: model.{key} must be a {kind.__name__}, got {value!r}")
            if kind is int and value < 1:
                raise RankingsSchemaError(f"{source}: model.{key} must be at least 1, got {value}")
        revision = d.get("revision")
        if revision is not None and not isinstance(revision, str):
            raise RankingsSchemaError(f"{source}: model.revision must be a string or null, got {revision!r}")
        return cls(id=d["id"], revision=revision, family=d["family"], num_layers=d["num_layers"],
                   num_heads=d["num_heads"], intermediate_size=d["intermediate_size"])

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.id}{rev}"


def _float32(t: torch.Tensor, name: str, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {list(t.shape)}")
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return t


@dataclass(eq=False)
class Scales:
    """Learned steering scales s of some neurons: z̃ = z · (1 + s).

    Attributes:
        layers, neurons: int64 `[n]`, the (layer, neuron) each scale applies to (pairs unique).
        scale: float32 `[n]`.
        meta: JSON-able description (method, task, settings), kept in the safetensors metadata.
    """
    layers: torch.Tensor
    neurons: torch.Tensor
    scale: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = torch.as_tensor(self.layers).detach().to("cpu", torch.int64).reshape(-1).contiguous()
        self.neurons = torch.as_tensor(self.neurons).detach().to("cpu", torch.int64).reshape(-1).contiguous()
        self.scale = _float32(torch.as_tensor(self.scale).reshape(-1), "scale", 1)
        if not (len(self.layers) == len(self.neurons) == len(self.scale)):
            raise ValueError(f"scales need one layer and one neuron per scale; got {len(self.layers)} layers, "
                             f"{len(self.neurons)} neurons, {len(self.scale)} scales")
        if len(set(zip(self.layers.tolist(), self.neurons.tolist()))) != len(self.scale):
            raise ValueError("scales list a (layer, neuron) pair more than once")
        if (self.layers < 0).any() or (self.neurons < 0).any():
            raise ValueError("scale layer and neuron indices must be >= 0")
        json.dumps(self.meta)   # fails now, not at save time, if meta is not JSON-able

    def __len__(self) -> int:
        return len(self.scale)

    def as_selection(self) -> dict[int, list[int]]:
        """{layer: sorted neurons} of the scaled neurons."""
        return {layer: neurons for layer, (neurons, _) in self.multipliers().items()}

    def multipliers(self) -> dict[int, tuple[list[int], list[float]]]:
        """{layer: (neurons sorted, 1 + s for each)}: what to multiply z by."""
        out: dict[int, tuple[list[int], list[float]]] = {}
        for layer, neuron, s in sorted(zip(self.layers.tolist(), self.neurons.tolist(), self.scale.tolist())):
            neurons, factors = out.setdefault(layer, ([], []))
            neurons.append(neuron)
            factors.append(1.0 + s)
        return out

    def __repr__(self) -> str:
        return f"Scales(n={len(self)}, layers={sorted(set(self.layers.tolist()))}, meta={self.meta})"


@dataclass(eq=False)
class TaskRanking:
    """Head scores and neuron rankings of one task.

    Attributes:
        task: one of `TASKS`.
        head_scores: S(l, h), `[layers, heads]` float32.
        importance: I(l, i), `[layers, intermediate]` float32, the HONES ranking.
        top_heads: H*, (layer, head) pairs best first.
        baselines: other rankings by method name ("activation", "dvp"), each `[layers, intermediate]`.
        fallback: no top head scored above 0, so `importance` is the unconditioned DVP.
        scales: learned steering scales, if trained.
        notes: free text shown in the card (e.g. why fallback happened).
    """
    task: str
    head_scores: torch.Tensor
    importance: torch.Tensor
    top_heads: list[tuple[int, int]]
    baselines: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback: bool = False
    scales: Scales | None = None
    notes: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        self.head_scores = _float32(self.head_scores, "head_scores", 2)
        self.importance = _float32(self.importance, "importance", 2)
        self.top_heads = [(int(layer), int(head)) for layer, head in self.top_heads]
        num_layers, num_heads = self.head_scores.shape
        if self.importance.shape[0] != num_layers:
            raise ValueError(f"head_scores has {num_layers} layers but importance has {self.importance.shape[0]}")
        for layer, head in self.top_heads:
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise ValueError(f"top head ({layer}, {head}) is outside head_scores {list(self.head_scores.shape)}")
        baselines = {}
        for name, matrix in self.baselines.items():
            if name in RESERVED_METHODS or name == "importance" or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"{name!r} cannot name a baseline (reserved or not a plain identifier)")
            matrix = _float32(matrix, f"baseline {name!r}", 2)
            if matrix.shape != self.importance.shape:
                raise ValueError(f"baseline {name!r} has shape {list(matrix.shape)}, importance has "
                                 f"{list(self.importance.shape)}")
            baselines[name] = matrix
        self.baselines = baselines
        self.fallback = bool(self.fallback)
        if self.scales is not None:
            L, I = self.importance.shape
            if len(self.scales) and (int(self.scales.layers.max()) >= L or int(self.scales.neurons.max()) >= I):
                raise ValueError(f"scales index neurons outside importance [{L}, {I}]")

    def __repr__(self) -> str:
        return (f"TaskRanking(task={self.task!r}, head_scores={list(self.head_scores.shape)}, "
                f"importance={list(self.importance.shape)}, top_heads={self.top_heads}, "
                f"baselines={list(self.baselines)}, fallback={self.fallback}, scales={self.scales!r})")

    def methods(self) -> list[str]:
        """Ranking methods available: "hones", the baselines present, and "random"."""
        return ["hones", *self.baselines, "random"]

    def matrix(self, method: str) -> torch.Tensor:
        """The `[layers, intermediate]` scores of a method ("hones" = importance, or a baseline)."""
        if method == "hones":
            return self.importance
        if method in self.baselines:
            return self.baselines[method]
        if method == "random":
            raise ValueError("'random' has no score matrix: its neurons are drawn at selection time "
                             "(use select('random', ratio, seed=...))")
        raise ValueError(f"unknown ranking method {method!r} for task {self.task!r}; "
                         f"available: {', '.join(self.methods())}")

    def select(self, method: str = "hones", ratio: float = DEFAULT_RATIO, *, seed: int = 0) -> Selection:
        """The neurons a method picks at a budget of `ratio` of all (layer, neuron) pairs.

        `max(1, round(ratio * layers * intermediate))` neurons: the global top of the method's
        matrix (ties broken by lower flat index), or for "random" the same per-layer counts as
        the HONES selection with neurons drawn uniformly inside each layer from
        `torch.Generator().manual_seed(seed)`.

        Returns:
            {layer: sorted neuron indices} for the layers with at least one neuron.

        Raises:
            ValueError: `ratio` outside (0, 1], or an unknown method.
        """
        width = self.importance.shape[1]
        if method == "random":
            return random_like(counts(self.select("hones", ratio)), width, seed=seed)
        order, _ = top_flat(self.matrix(method), ratio)
        return from_flat(order.tolist(), width)

    def ranked(self, method: str = "hones", ratio: float = DEFAULT_RATIO) -> list[tuple[int, int, float]]:
        """The same neurons as `select(method, ratio)` as (layer, neuron, score), best first."""
        order, scores = top_flat(self.matrix(method), ratio)
        width = self.importance.shape[1]
        return [(i // width, i % width, s) for i, s in zip(order.tolist(), scores.tolist())]


@dataclass(eq=False)
class Rankings:
    """A whole artifact: the model it belongs to and one `TaskRanking` per task."""
    model: ModelInfo
    tasks: dict[str, TaskRanking]
    params: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    created_with: str = f"hones_core {__version__}"
    source: dict | None = None      # where `load` read it: {"id", "revision", "commit"} (None: built in memory)

    def __post_init__(self):
        for name, ranking in self.tasks.items():
            if ranking.task != name:
                raise ValueError(f"tasks[{name!r}] holds the ranking of task {ranking.task!r}")

    def task(self, name: str) -> TaskRanking:
        """The ranking of one task.

        Raises:
            RankingsError: the artifact has no such task (the message lists those it has).
        """
        if name not in self.tasks:
            raise RankingsError(f"rankings have no {name!r} task; available: {', '.join(self.tasks) or 'none'}"
                                f" — compute it with `python -m hones_core rank --task {name} ...`")
        return self.tasks[name]


# --------------------------------------------------------------------------- validation


def validate(rankings: Rankings, *, num_layers: int, num_heads: int, intermediate_size: int,
             model_id: str = "") -> None:
    """Check that the rankings fit a model of these shapes.

    Raises:
        RankingsMismatchError: one clause per mismatched dimension, naming both sides.
    """
    _raise_mismatches(rankings.model, model_id, [
        ("layers", rankings.model.num_layers, num_layers),
        ("heads per layer", rankings.model.num_heads, num_heads),
        ("FFN neurons per layer (intermediate size)", rankings.model.intermediate_size, intermediate_size),
    ])


def check_against(rankings: Rankings, arch: Any, *, model_id: str = "") -> None:
    """Check the rankings against a loaded model's `Architecture`: family and shapes.

    Raises:
        RankingsMismatchError: a family or shape mismatch, naming both sides.
    """
    _raise_mismatches(rankings.model, model_id, [
        ("family", rankings.model.family, arch.family.name),
        ("layers", rankings.model.num_layers, arch.num_layers),
        ("heads per layer", rankings.model.num_heads, arch.num_heads),
        ("FFN neurons per layer (intermediate size)", rankings.model.intermediate_size, arch.intermediate_size),
    ])


def _raise_mismatches(made_for: ModelInfo, model_id: str, checks: list[tuple[str, Any, Any]]) -> None:
    theirs = made_for.describe()
    ours = f" ({model_id})" if model_id else ""
    clauses = []
    for what, expected, actual in checks:
        if expected != actual:
            if what == "family":
                clauses.append(f"rankings were made for the {expected!r} family ({theirs}); "
                               f"this model{ours} is {actual!r}")
            else:
                clauses.append(f"rankings were made for {expected} {what} ({theirs}); this model{ours} has {actual}")
    if clauses:
        target = model_id or "this model"
        raise RankingsMismatchError("; ".join(clauses) + f" — use rankings computed for {target} "
                                    f"(`python -m hones_core rank --model {model_id or '<model>'} ...`)")


def _check_task_shapes(model: ModelInfo, ranking: TaskRanking, where: str) -> None:
    expected_heads = (model.num_layers, model.num_heads)
    expected_neurons = (model.num_layers, model.intermediate_size)
    problems = []
    if tuple(ranking.head_scores.shape) != expected_heads:
        problems.append(f"head_scores {list(ranking.head_scores.shape)} (the model needs {list(expected_heads)})")
    if tuple(ranking.importance.shape) != expected_neurons:
        problems.append(f"importance {list(ranking.importance.shape)} (the model needs {list(expected_neurons)})")
    if problems:
        raise RankingsMismatchError(f"{where}: task {ranking.task!r} does not fit {model.describe()} "
                                    f"[{model.num_layers} layers, {model.num_heads} heads, "
                                    f"{model.intermediate_size} neurons]: " + "; ".join(problems))


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
        _check_task_shapes(rankings.model, ranking, "cannot save")
    json.dumps({"params": rankings.params, "data": rankings.data})   # not JSON-able: fail before writing
    directory.mkdir(parents=True, exist_ok=True)
    for ranking in rankings.tasks.values():
        _write_task(directory, ranking)
    figures = _card_figures(directory) if figures is None else figures
    atomic_write(directory / CARD_FILE, dataset_card(rankings, figures).encode())
    atomic_write(directory / MANIFEST, json_bytes(_manifest(rankings)))   # last: it commits the rest
    return directory


def save_task(rankings_dir: str | Path, task_ranking: TaskRanking) -> Path:
    """Add (or replace) one task of an existing artifact; the manifest lists it afterwards.

    Raises:
        RankingsNotFoundError: no folder at `rankings_dir`.
        RankingsSchemaError: the folder is not a valid artifact.
        RankingsMismatchError: the task does not fit the artifact's model.
    """
    directory = Path(rankings_dir)
    rankings = _read_dir(_existing_dir(directory), origin=str(directory))
    _check_task_shapes(rankings.model, task_ranking, f"cannot add to {directory}")
    rankings.tasks[task_ranking.task] = task_ranking
    _write_task(directory, task_ranking)
    atomic_write(directory / CARD_FILE, dataset_card(rankings, _card_figures(directory)).encode())
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
    rankings = _read_dir(_existing_dir(directory), origin=str(directory))
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
    atomic_write(directory / CARD_FILE, dataset_card(rankings, _card_figures(directory)).encode())
    return path


# --------------------------------------------------------------------------- dataset card


_FIGURE_LINE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<path>[^)]+)\)\s*$", re.MULTILINE)


def _card_figures(directory: Path) -> dict[str, str]:
    """The figures an existing card links to, so rewriting the card keeps them."""
    card = directory / CARD_FILE
    if not card.exists():
        return {}
    return {m["path"]: m["caption"] for m in _FIGURE_LINE.finditer(card.read_text(encoding="utf-8"))}


def _format_value(value: Any) -> str:
    return f"`{json.dumps(value)}`" if isinstance(value, (dict, list)) else f"`{value}`"


def dataset_card(rankings: Rankings, figures: Mapping[str, str] | None = None) -> str:
    """The README.md of a rankings dataset repo: YAML front matter, then model, tasks, params, data, figures.

    Args:
        rankings: the artifact.
        figures: {PNG path relative to the artifact folder: caption}.
    """
    model = rankings.model
    # JSON strings are valid YAML scalars, so ids with ':' or quotes stay safe.
    front = "\n".join([
        "---",
        "license: mit",
        f"pretty_name: {json.dumps(f'HONES rankings for {model.id}')}",
        "tags:",
        "- hones",
        "- interpretability",
        "- vision-language",
        "---",
    ])
    lines = [
        front, "",
        f"# HONES rankings for {model.id}", "",
        "Critical attention heads and head-conditioned FFN neuron rankings computed with "
        "[HONES](https://github.com/petergit1/HONES) (*From Heads to Neurons: Causal Attribution and Steering "
        "in Multi-Task Vision-Language Models*), "
        f"stored as schema `{SCHEMA}` by {rankings.created_with}.", "",
        "## Model", "",
        f"- id: `{model.id}`",
        f"- revision: `{model.revision or 'unpinned'}`",
        f"- family: `{model.family}`",
        f"- shapes: {model.num_layers} layers x {model.num_heads} heads; "
        f"{model.num_layers} layers x {model.intermediate_size} FFN neurons", "",
        "## Tasks", "",
        "| task | top heads (layer.head) | neurons at 1 % | baselines | learned scales | fallback |",
        "|---|---|---|---|---|---|",
    ]
    for name, ranking in rankings.tasks.items():
        heads = ", ".join(f"{layer}.{head}" for layer, head in ranking.top_heads[:10])
        if len(ranking.top_heads) > 10:
            heads += f", … ({len(ranking.top_heads)} in all)"
        count = sum(len(v) for v in ranking.select("hones", DEFAULT_RATIO).values())
        scales = f"{len(ranking.scales)} neurons" if ranking.scales is not None else "—"
        fallback = "yes: unconditioned DVP" if ranking.fallback else "no"
        lines.append(f"| {name} | {heads or '—'} | {count} | {', '.join(ranking.baselines) or '—'} | {scales} "
                     f"| {fallback} |")
    notes = [(name, r.notes) for name, r in rankings.tasks.items() if r.notes]
    if notes:
        lines += ["", *[f"- **{name}**: {text}" for name, text in notes]]
    for title, values in (("Parameters", rankings.params), ("Data", rankings.data)):
        lines += ["", f"## {title}", ""]
        lines += [f"- {key}: {_format_value(value)}" for key, value in values.items()] or ["- (none recorded)"]
    lines += ["", "## Use", "", "```python",
              "from hones_core import rankings",
              "artifact = rankings.load(\"<this repo id>\")   # or a local folder",
              "neurons = artifact.task(\"vqa\").select(\"hones\", 0.01)   # {layer: [neuron, ...]}",
              "```"]
    if figures:
        lines += ["", "## Figures", ""]
        for png, caption in figures.items():
            lines += [f"![{caption}]({png})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- reading


def _existing_dir(directory: Path) -> Path:
    if not directory.exists():
        raise RankingsNotFoundError(f"no rankings folder at {directory} — check the path, or compute one with "
                                    f"`python -m hones_core rank --model <model> --data <file> --task all "
                                    f"--out {directory}`", source=str(directory))
    if not directory.is_dir():
        raise RankingsNotFoundError(f"{directory} is a file; a rankings artifact is a folder with {MANIFEST}", source=str(directory))
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
    try:
        ranking = TaskRanking(task=task, head_scores=head_scores, importance=importance, top_heads=top_heads,
                              baselines=baselines, fallback=top["fallback"], scales=scales,
                              notes=str(top.get("notes", "")))
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


def _read_dir(directory: Path, *, origin: str) -> Rankings:
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
    return Rankings(model=model, tasks={t: _read_task(directory, t, model, origin) for t in tasks},
                    params=manifest.get("params", {}), data=manifest.get("data", {}),
                    created_with=str(manifest.get("created_with", "")))


def _looks_like_repo_id(source: str) -> bool:
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or (os.sep != "/" and os.sep in source):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def _download(repo_id: str, *, revision: str | None, cache_dir: str | Path | None, token: str | bool | None) -> Path:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    incomplete = getattr(errors, "IncompleteSnapshotError", None)   # huggingface_hub >= 2

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                      token=token))
    except GatedRepoError as e:
        raise RankingsNotFoundError(
            f"the Hub dataset repo {repo_id} is gated: accept its conditions on the Hub and set HF_TOKEN "
            f"(or pass token=)", source=repo_id, revision=revision) from e
    except RepositoryNotFoundError as e:
        raise RankingsNotFoundError(
            f"no Hub dataset repo {repo_id} (and no local folder of that name): check the id, and for a private "
            f"repo set HF_TOKEN (or pass token=) with read access", source=repo_id, revision=revision) from e
    except RevisionNotFoundError as e:
        raise RankingsNotFoundError(
            f"the Hub dataset repo {repo_id} has no revision {revision!r}: check the branch, tag or commit sha", source=repo_id, revision=revision) from e
    except LocalEntryNotFoundError as e:
        if incomplete is not None and isinstance(e, incomplete):
            raise RankingsNotFoundError(
                f"the cached copy of {at} is incomplete and the Hub cannot be reached to complete it: download "
                f"it again online (unset HF_HUB_OFFLINE)", source=repo_id, revision=revision) from e
        first_line = (str(e.__cause__).splitlines() or [""])[0]
        cause = f" ({type(e.__cause__).__name__}: {first_line})" if e.__cause__ is not None else ""
        if constants.is_offline_mode():
            raise RankingsNotFoundError(
                f"{at} is no local folder, and not in the Hub cache while offline mode is on (HF_HUB_OFFLINE=1): "
                f"download it once online, or unset HF_HUB_OFFLINE", source=repo_id, revision=revision) from e
        raise RankingsNotFoundError(
            f"{at} is no local folder, and could not reach the Hub at {constants.ENDPOINT} to download it, nor "
            f"find it in the cache{cause}: "
            f"check the connection (or HF_ENDPOINT); with HF_HUB_OFFLINE=1 a cached copy is used", source=repo_id, revision=revision) from e
    except _transport_errors() as e:
        raise RankingsNotFoundError(
            f"lost the connection to the Hub at {constants.ENDPOINT} while downloading {at}: {e} — retry, or "
            f"use a cached copy with HF_HUB_OFFLINE=1", source=repo_id, revision=revision) from e


def load(source: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
         token: str | bool | None = None) -> Rankings:
    """Read an artifact from a local folder or a Hub dataset repo, and validate it.

    Args:
        source: an existing folder, or a Hub dataset repo id "org/name".
        revision: branch, tag or commit sha (Hub only).
        cache_dir: Hub cache folder (default: the huggingface_hub cache; honours HF_HUB_OFFLINE).
        token: Hub token for private repos (default: HF_TOKEN or the saved login).

    Returns:
        The `Rankings`, every task's tensors checked against the manifest's model shapes.

    Raises:
        RankingsNotFoundError: neither a folder nor a reachable repo / revision.
        RankingsSchemaError: a file is missing or malformed (the message names it).
    """
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {path} is a local folder")
        rankings = _read_dir(_existing_dir(path), origin=str(path))
        rankings.source = {"id": str(path.resolve()), "revision": None, "commit": None}
        return rankings
    source = str(source)
    if not _looks_like_repo_id(source):
        raise RankingsNotFoundError(f"no rankings folder at {path}, and {source!r} is not a Hub repo id "
                                    f"('org/name') — check the path", source=str(source), revision=revision)
    snapshot = _download(source, revision=revision, cache_dir=cache_dir, token=token)
    rankings = _read_dir(snapshot, origin=f"{source}@{revision}" if revision else source)
    # a Hub snapshot folder is named after the commit it holds
    rankings.source = {"id": source, "revision": revision, "commit": snapshot.name}
    return rankings


# --------------------------------------------------------------------------- Hub upload


def push(path: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         revision: str | None = None, commit_message: str = "Upload HONES rankings") -> str:
    """Upload an artifact folder to a Hub dataset repo (created if needed).

    Only the manifest, the card, the manifest's task folders and other non-hidden files
    (figures) are uploaded; task folders the manifest does not list are left out.

    Args:
        path: the artifact folder (validated with `load` first).
        repo_id: "org/name".
        token: write token (default: HF_TOKEN or the saved login).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: the commit summary.

    Returns:
        The commit URL (a `huggingface_hub.CommitInfo`, a `str` with `.oid`, the commit sha).

    Raises:
        RankingsNotFoundError, RankingsSchemaError: `path` is not a valid artifact; or the Hub
            cannot be reached.
    """
    from huggingface_hub import HfApi, constants

    directory = Path(path)
    if not directory.is_dir():
        raise RankingsNotFoundError(f"no rankings folder at {directory} — `push` uploads a local artifact folder", source=repo_id)
    rankings = _read_dir(directory, origin=str(directory))
    left_out = [f"{task}/*" for task in TASKS if task not in rankings.tasks]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        return api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="dataset",
                                 revision=revision, commit_message=commit_message,
                                 ignore_patterns=[".*", "**/.*", *left_out])
    except _transport_errors() as e:
        raise RankingsNotFoundError(f"could not reach the Hub at {constants.ENDPOINT} to push {repo_id}: {e} — "
                                    f"check the connection (or HF_ENDPOINT)", source=repo_id) from e


# --------------------------------------------------------------------------- official release


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
    directory = _existing_dir(Path(files_dir))
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

    heads_path = directory / "heads.json"
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

    top_path = directory / "neurons_top1pct.json"
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

    baseline = heads.get("baseline") if isinstance(heads.get("baseline"), dict) else {}
    notes = [f"imported from the official HONES release output ({len(top_heads)} top heads, "
             f"{len(listed)} top neurons = {100 * len(listed) / (L * I):.3g} %)"]
    if "metric" in baseline:
        notes.append(f"base {baseline.get('metric_name', 'utility')} {baseline['metric']}")
    if not positive:
        notes.append("no top head had a positive score, so the importance is the unconditioned DVP")
    return TaskRanking(task=task, head_scores=torch.from_numpy(head_scores.astype(np.float32)),
                       importance=torch.from_numpy(importance.astype(np.float32)), top_heads=top_heads,
                       fallback=not positive, notes="; ".join(notes))
