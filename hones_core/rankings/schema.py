"""The rankings artifact's schema (v1): its data types, file names, and checks against a model.

An artifact is a directory, and a Hub *dataset* repo with the same files:

    manifest.json               {"schema": "hones-rankings/1", "model": {...}, "tasks": [...],
                                 "params": {...}, "data": {...}, "created_with": "hones_core x.y"}
    <task>/heads.safetensors    "head_scores" [layers, heads] float32
    <task>/neurons.safetensors  "importance" [layers, intermediate] float32 (the HONES ranking)
                                + baseline matrices under their method names ("activation", "dvp")
    <task>/top.json             the top selection at the default ratio, the top heads, fallback, notes
    <task>/scales.safetensors   optional learned scales: "scale" [n] float32, "layer"/"neuron" [n] int64
    <task>/stats.safetensors    optional per-neuron discovery statistics of z at the last prompt position:
                                "mean", "std", "mean_abs", "positive" [layers, intermediate] float32,
                                metadata "items" (how many), "position" and "data" (JSON)
    README.md                   dataset card

An artifact without stats files (written before they existed) loads as before; its tasks'
`stats` is None (`python -m hones_core stats ...` adds them without re-ranking).

`ModelInfo`, `Scales`, `TaskRanking` and `Rankings` hold it in memory; `validate`,
`check_against` and `check_task_shapes` refuse rankings that do not fit a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import RankingsError, RankingsMismatchError, RankingsSchemaError
from ..selection import Selection, budget, counts, from_flat, random_like, top_flat
from ..tasks import TASKS

SCHEMA = "hones-rankings/1"
DEFAULT_RATIO = 0.01
RESERVED_METHODS = ("hones", "random")

MANIFEST = "manifest.json"
HEADS_FILE = "heads.safetensors"
NEURONS_FILE = "neurons.safetensors"
TOP_FILE = "top.json"
SCALES_FILE = "scales.safetensors"
CARD_FILE = "README.md"
STATS_FILE = "stats.safetensors"        # optional: per-neuron discovery statistics (NeuronStats)
STATS_POSITION = "last_prompt"          # where they are measured: the position DVP reads (the first answer token's)
EVALUATION_FILE = "evaluation.json"     # optional: stored `mask-eval` results (budgets, methods, cross-ablation)
# other names people use for a method: the paper's issue text calls mean |z| "magnitude"
METHOD_ALIASES = {"magnitude": "activation"}
# the order menus and tables list baselines in (files store them alphabetically): the paper's, then ours
BASELINE_ORDER = ("ap", "ma", "ape", "activation", "dvp")


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
class NeuronStats:
    """Per-neuron statistics of the FFN activation z over a task's discovery items.

    Measured where the method measures the write-in contribution: at the last prompt position
    (the position whose output predicts the first answer token), one value per item, with no
    intervention; retrieval items use the positive candidate's prompt (`TaskItem.prompt`).

    Attributes:
        mean: mean z, `[layers, intermediate]` float32.
        std: standard deviation of z over the items (population, ddof 0), same shape, >= 0.
        mean_abs: mean |z|, same shape.
        positive: fraction of items with z > 0, same shape, in [0, 1].
        items: how many items the statistics are over (>= 1).
        position: where z was read (`STATS_POSITION`).
        data: JSON-able description of the split (file name, item count, image digest).
    """
    mean: torch.Tensor
    std: torch.Tensor
    mean_abs: torch.Tensor
    positive: torch.Tensor
    items: int
    position: str = STATS_POSITION
    data: dict = field(default_factory=dict)

    FIELDS = ("mean", "std", "mean_abs", "positive")

    def __post_init__(self):
        for name in self.FIELDS:
            setattr(self, name, _float32(getattr(self, name), f"stats {name!r}", 2))
        shapes = {tuple(getattr(self, name).shape) for name in self.FIELDS}
        if len(shapes) != 1:
            raise ValueError(f"stats tensors must share one [layers, intermediate] shape, got "
                             f"{ {name: list(getattr(self, name).shape) for name in self.FIELDS} }")
        if isinstance(self.items, bool) or not isinstance(self.items, int) or self.items < 1:
            raise ValueError(f"stats must be over at least one item, got items={self.items!r}")
        if (self.std < 0).any() or (self.mean_abs < 0).any():
            raise ValueError("stats 'std' and 'mean_abs' cannot be negative")
        if (self.positive < 0).any() or (self.positive > 1).any():
            raise ValueError("stats 'positive' is a fraction of items and must lie in [0, 1]")
        json.dumps(self.data)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean.shape)

    def of(self, layer: int, neuron: int) -> dict[str, float]:
        """{"mean", "std", "mean_abs", "positive"} of one neuron, as floats."""
        return {name: float(getattr(self, name)[layer, neuron]) for name in self.FIELDS}

    def __repr__(self) -> str:
        return f"NeuronStats(shape={list(self.shape)}, items={self.items}, position={self.position!r})"


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
        stats: per-neuron discovery statistics (`NeuronStats`), if stored.
    """
    task: str
    head_scores: torch.Tensor
    importance: torch.Tensor
    top_heads: list[tuple[int, int]]
    baselines: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback: bool = False
    scales: Scales | None = None
    notes: str = ""
    stats: NeuronStats | None = None

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
        if self.stats is not None and self.stats.shape != tuple(self.importance.shape):
            raise ValueError(f"stats have shape {list(self.stats.shape)}, importance has "
                             f"{list(self.importance.shape)}")

    def __repr__(self) -> str:
        return (f"TaskRanking(task={self.task!r}, head_scores={list(self.head_scores.shape)}, "
                f"importance={list(self.importance.shape)}, top_heads={self.top_heads}, "
                f"baselines={list(self.baselines)}, fallback={self.fallback}, scales={self.scales!r}, "
                f"stats={self.stats!r})")

    def positive_only(self, method: str) -> bool:
        """Whether `method` selects only neurons with a score above 0.

        HONES importance is a weighted sum of positive parts (or, in the fallback, the mean
        contribution c̄): a neuron at 0 has no evidence for the task, so it is never picked to
        fill a budget.
        """
        return method == "hones"

    def positive(self, method: str = "hones") -> int:
        """How many neurons have a score above 0 under `method`."""
        return int((self.matrix(method) > 0).sum())

    def shortfall(self, method: str = "hones", ratio: float = DEFAULT_RATIO) -> int:
        """Neurons the budget asks for that `select(method, ratio)` leaves out for want of a positive
        score (0 for methods that are not positive-only; "random" follows "hones")."""
        base = "hones" if method == "random" else method
        if not self.positive_only(base):
            return 0
        return max(0, budget(ratio, self.importance.numel()) - self.positive(base))

    def has(self, method: str) -> bool:
        """Whether `method` (or an alias of one, `METHOD_ALIASES`) can select neurons here."""
        return METHOD_ALIASES.get(method, method) in self.methods()

    def methods(self) -> list[str]:
        """Ranking methods available: "hones", the baselines present, and "random"."""
        known = [m for m in BASELINE_ORDER if m in self.baselines]
        return ["hones", *known, *sorted(set(self.baselines) - set(known)), "random"]

    def matrix(self, method: str) -> torch.Tensor:
        """The `[layers, intermediate]` scores of a method ("hones" = importance, or a baseline)."""
        method = METHOD_ALIASES.get(method, method)
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
        `torch.Generator().manual_seed(seed)`. HONES takes only neurons with importance above
        0, so it may return fewer (`shortfall` says how many fewer).

        Returns:
            {layer: sorted neuron indices} for the layers with at least one neuron.

        Raises:
            ValueError: `ratio` outside (0, 1], or an unknown method.
        """
        width = self.importance.shape[1]
        if method == "random":
            return random_like(counts(self.select("hones", ratio)), width, seed=seed)
        order, _ = top_flat(self.matrix(method), ratio, positive_only=self.positive_only(method))
        return from_flat(order.tolist(), width)

    def rank_of(self, method: str, layer: int, neuron: int) -> int:
        """1-based rank of (layer, neuron) among all layers x intermediate neurons by `method`'s score.

        The order `select` uses: higher score first, ties broken by the lower flat index
        (layer * intermediate + neuron), so `select(method, ratio)` holds exactly the neurons of
        rank <= `budget(ratio, ...)` (for HONES: those of them with importance > 0).

        Raises:
            ValueError: an unknown method, "random" (no scores), or an index outside the matrix.
        """
        matrix = self.matrix(method)
        L, I = matrix.shape
        if not (0 <= layer < L and 0 <= neuron < I):
            raise ValueError(f"neuron ({layer}, {neuron}) is outside the rankings' {L} layers x {I} neurons "
                             f"(valid: layer 0..{L - 1}, neuron 0..{I - 1})")
        flat = matrix.flatten()
        index = layer * I + neuron
        score = flat[index]
        return 1 + int((flat > score).sum()) + int((flat[:index] == score).sum())

    def ranked(self, method: str = "hones", ratio: float = DEFAULT_RATIO) -> list[tuple[int, int, float]]:
        """The same neurons as `select(method, ratio)` as (layer, neuron, score), best first."""
        order, scores = top_flat(self.matrix(method), ratio, positive_only=self.positive_only(method))
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
    evaluation: dict | None = None  # stored `mask-eval --into-rankings` results (EVALUATION_FILE), if any

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


def check_against(rankings: Rankings, arch: Any, *, model_id: str = "", revision: str | None = None,
                  allow_other_model: bool = False) -> str | None:
    """Check the rankings against a loaded model: family and shapes, then which model it is.

    Shapes alone do not tell a model from its fine-tune, so when both the manifest's model and
    `model_id` are Hub ids, they must name the same repo (and the same revision, where both
    give one). Local folders are compared by shape only: a local copy of a Hub model is as
    common as a local fine-tune, and a path says nothing about which it is.

    Args:
        model_id: the loaded model's Hub id or local path.
        revision: the revision it was loaded at (None: the default branch).
        allow_other_model: accept another model of the same shapes; the return value says so.

    Returns:
        None, or (with `allow_other_model`) the note to record: which models differ.

    Raises:
        RankingsMismatchError: a family or shape mismatch, or another Hub model, naming both sides.
    """
    _raise_mismatches(rankings.model, model_id, [
        ("family", rankings.model.family, arch.family.name),
        ("layers", rankings.model.num_layers, arch.num_layers),
        ("heads per layer", rankings.model.num_heads, arch.num_heads),
        ("FFN neurons per layer (intermediate size)", rankings.model.intermediate_size, arch.intermediate_size),
    ])
    made_for = rankings.model
    if not (is_hub_id(made_for.id) and is_hub_id(model_id)):
        return None
    other_repo = made_for.id.lower() != model_id.lower()
    other_revision = made_for.revision is not None and revision is not None and made_for.revision != revision
    if not (other_repo or other_revision):
        return None
    loaded = f"{model_id}@{revision}" if revision else model_id
    note = (f"the rankings were computed for {made_for.describe()}, and the model loaded is {loaded} "
            f"(same family and shapes)")
    if allow_other_model:
        return note
    raise RankingsMismatchError(f"{note}: shapes cannot tell a model from its fine-tune, so these rankings may not "
                                f"describe it — use rankings computed for {loaded}, or pass --allow-other-model "
                                f"(HONES_ALLOW_OTHER_MODEL=1 for the app) to use them anyway")


def is_hub_id(name: str | None) -> bool:
    """`org/name` that is not an existing local path (what the Hub would be asked for)."""
    if not name or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        return False
    return not Path(name).expanduser().exists()


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


def check_task_shapes(model: ModelInfo, ranking: TaskRanking, where: str) -> None:
    """Check that one task's head and neuron matrices have `model`'s shapes (before writing it).

    Args:
        model: the model the artifact belongs to.
        ranking: the task to check.
        where: what was being done, the start of the message (e.g. "cannot save").

    Raises:
        RankingsMismatchError: head_scores or importance has another shape; the message names both.
    """
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


__all__ = ["SCHEMA", "DEFAULT_RATIO", "RESERVED_METHODS", "MANIFEST", "HEADS_FILE", "NEURONS_FILE", "TOP_FILE",
           "SCALES_FILE", "STATS_FILE", "STATS_POSITION", "CARD_FILE", "EVALUATION_FILE", "ModelInfo", "Scales",
           "NeuronStats", "TaskRanking", "Rankings", "validate",
           "check_against", "is_hub_id", "check_task_shapes"]
