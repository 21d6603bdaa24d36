"""Interventions on a VLM's text decoder: head mean-replacement and FFN neuron scaling.

An intervention is data: a frozen `Plan` says which (layer, head) pairs to mean-replace and
which neurons to scale by which factor (0 masks). `intervene(arch, plans)` applies one plan
to the whole batch or one plan per batch row, for everything run inside the `with` block.
Every plan is built here: `Plan.ablate_heads`, `Plan.scale_neurons` (one factor),
`Plan.multiply_neurons` (a multiplier per neuron, e.g. stored scales 1 + s) and
`Plan.learned` (trainable scales for `steering`).

How it stays correct under concurrency (`hooks.HookRegistry`): the forward pre-hooks on
`o_proj` and `down_proj` are installed once per model while at least one `intervene` block
is open (reference counted, removed when the last one exits), and each hook reads the plan
of *its own* thread/task from a `contextvars.ContextVar`. A hook finding no plan does
nothing, so plain runs and other threads' runs are untouched and no lock is held during
forward passes.

When a layer runs on some of the batch's rows only, a `hooks.RowView` says which: the hooks
then take those rows of the per-row plan tables and copy captured activations back to every
row, so plans and captures mean the same as when every row runs. `plan_classes` tells which
rows' plans act alike at a layer (rows whose plans differ there must not be merged).

Semantics (DESIGN.md section 3):
- head h of layer l, mean replacement: at every position, head h's slice of the
  concatenated head outputs (the input of `o_proj`) is replaced by the mean of the other
  heads' slices at that position (computed from the unmodified slices);
- neuron i of layer l, scaling: z_i <- z_i * factor at every position, where z is the
  input of `down_proj`; factor 0 masks the neuron. `LearnedScale` gives z_i * (1 + s_i)
  with a trainable tensor s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .arch import Architecture
from .hooks import HookRegistry, RefCountedHooks, RowView, model_key, row_view


@dataclass(frozen=True)
class NeuronScale:
    """Multiply neurons `neurons` of `layer` by `factor` (one value, or one per neuron)."""
    layer: int
    neurons: tuple[int, ...]
    factor: float | tuple[float, ...] = 0.0

    def multipliers(self) -> torch.Tensor:
        if isinstance(self.factor, tuple):
            if len(self.factor) != len(self.neurons):
                raise ValueError(f"layer {self.layer}: {len(self.factor)} factors for {len(self.neurons)} neurons")
            return torch.tensor(self.factor, dtype=torch.float32)
        return torch.full((len(self.neurons),), float(self.factor))


@dataclass(frozen=True, eq=False)
class LearnedScale:
    """z_i <- z_i * (1 + scale_i) for `neurons` of `layer`; `scale` may require grad."""
    layer: int
    neurons: tuple[int, ...]
    scale: torch.Tensor

    def multipliers(self) -> torch.Tensor:
        if self.scale.shape != (len(self.neurons),):
            raise ValueError(f"layer {self.layer}: scale shape {tuple(self.scale.shape)} for {len(self.neurons)} neurons")
        return 1.0 + self.scale


@dataclass(frozen=True)
class Plan:
    """What to change in one forward pass (for one batch row, or for all rows).

    Attributes:
        heads: (layer, head) pairs to mean-replace.
        neurons: neuron edits; several edits of one neuron multiply.
    """
    heads: tuple[tuple[int, int], ...] = ()
    neurons: tuple[NeuronScale | LearnedScale, ...] = ()

    @classmethod
    def ablate_heads(cls, heads: Sequence[tuple[int, int]]) -> Plan:
        return cls(heads=tuple((int(l), int(h)) for l, h in heads))

    @classmethod
    def scale_neurons(cls, selection: dict[int, Sequence[int]], factor: float) -> Plan:
        """Scale `{layer: [neuron, ...]}` by one factor (0 masks)."""
        return cls(neurons=tuple(NeuronScale(int(l), tuple(int(i) for i in ids), float(factor))
                                 for l, ids in sorted(selection.items()) if len(ids)))

    @classmethod
    def multiply_neurons(cls, multipliers: Mapping[int, tuple[Sequence[int], Sequence[float]]],
                         factor: float = 1.0) -> Plan:
        """Multiply each listed neuron by its own multiplier, times `factor`.

        Args:
            multipliers: `{layer: (neurons, multipliers)}`, e.g. stored scales' 1 + s
                (`rankings.Scales.multipliers()`).
            factor: one more factor on top (the app's slider; 1 leaves the multipliers as they are).
        """
        return cls(neurons=tuple(NeuronScale(int(layer), tuple(int(n) for n in neurons),
                                             tuple(float(m) * factor for m in mult))
                                 for layer, (neurons, mult) in sorted(multipliers.items()) if len(neurons)))

    @classmethod
    def learned(cls, layers: torch.Tensor, neurons: torch.Tensor, scale: torch.Tensor) -> Plan:
        """z_i <- z_i * (1 + scale_i) for each (layers_i, neurons_i), sorted by layer; gradients reach `scale`."""
        edits, start = [], 0
        for layer in torch.unique_consecutive(layers).tolist():
            count = int((layers == layer).sum())
            edits.append(LearnedScale(layer, tuple(neurons[start:start + count].tolist()), scale[start:start + count]))
            start += count
        return cls(neurons=tuple(edits))

    @property
    def empty(self) -> bool:
        return not self.heads and not self.neurons


@dataclass
class Capture:
    """What an `intervene` block recorded: FFN activations z of the first forward pass.

    `neurons[layer]` is `[batch, intermediate]` at the last position when capturing "last",
    `[batch, seq, intermediate]` when capturing "all"; values are after the plan's scaling.
    """
    positions: str
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Compiled:
    rows: int                                    # 1 = broadcast over the batch
    heads: dict[int, torch.Tensor]               # layer -> bool [rows, num_heads]
    neurons: dict[int, torch.Tensor]             # layer -> float [rows, intermediate]
    capture: Capture | None
    captured_layers: set[int] = field(default_factory=set)
    classes: dict[int, list[int]] = field(default_factory=dict)   # layer -> plan class per row (lazy)

    def plan_classes(self, layer: int) -> list[int] | None:
        """Per row, a number that is equal exactly for rows whose plans act identically at `layer`.

        Two rows get the same number when their head masks and neuron multipliers of that
        layer are equal to the bit; None when one plan covers every row.
        """
        if self.rows == 1:
            return None
        if layer not in self.classes:
            parts = [t.detach().cpu() for t in (self.heads.get(layer), self.neurons.get(layer)) if t is not None]
            seen: dict[tuple, int] = {}
            self.classes[layer] = [
                seen.setdefault(tuple(p[r].numpy().tobytes() for p in parts), len(seen)) for r in range(self.rows)]
        return self.classes[layer]


# per context: model key -> the compiled plans of the innermost open `intervene` block
_PLANS: HookRegistry[_Hooks] = HookRegistry("hones_active_plans")


def plan_classes(arch: Architecture, layer: int, rows: int) -> list[int] | None:
    """Which of a batch's `rows` rows have plans that act alike at `layer`, in this context.

    Returns one number per row, equal exactly for rows whose head masks and neuron multipliers
    of `layer` are equal to the bit; None when no plan or one plan for every row is active.
    Raises ValueError when per-row plans were given for another number of rows than `rows`.
    """
    compiled = _PLANS.current(model_key(arch))
    if compiled is None or compiled.rows == 1:
        return None
    if compiled.rows != rows:
        raise ValueError(f"layer {layer}: the batch has {rows} rows but {compiled.rows} per-row plans were given")
    return compiled.plan_classes(layer)


class _Hooks(RefCountedHooks):
    """The hooks of one model, installed while at least one `intervene` block is open."""

    def __init__(self, arch: Architecture):
        super().__init__(model_key(arch))
        self.arch = arch

    def install(self) -> list:
        handles = []
        for layer in self.arch.layers:
            handles.append(layer.o_proj.register_forward_pre_hook(self._head_hook(layer.index)))
            handles.append(layer.down_proj.register_forward_pre_hook(self._neuron_hook(layer.index)))
        return handles

    def _view(self, layer: int) -> RowView | None:
        return row_view(self.key, layer)

    def _head_hook(self, layer: int):
        num_heads, head_dim = self.arch.num_heads, self.arch.head_dim

        def hook(module, args):
            compiled = _PLANS.current(self.key)
            if compiled is None or layer not in compiled.heads:
                return None
            x = args[0]
            view = self._view(layer)
            _check_rows(compiled, x, layer, view)
            b, s, _ = x.shape
            per_head = x.view(b, s, num_heads, head_dim)
            others_mean = (per_head.sum(dim=2, keepdim=True) - per_head) / (num_heads - 1)
            mask = _rows_of(compiled, compiled.heads[layer], view).to(x.device)[:, None, :, None]
            return (torch.where(mask, others_mean, per_head).reshape(b, s, num_heads * head_dim), *args[1:])
        return hook

    def _neuron_hook(self, layer: int):
        def hook(module, args):
            compiled = _PLANS.current(self.key)
            if compiled is None:
                return None
            x = args[0]
            view = self._view(layer)
            result = None
            if layer in compiled.neurons:
                _check_rows(compiled, x, layer, view)
                table = _rows_of(compiled, compiled.neurons[layer], view)
                x = x * table.to(device=x.device, dtype=x.dtype)[:, None, :]
                result = (x, *args[1:])
            capture = compiled.capture
            if capture is not None and layer not in compiled.captured_layers:
                compiled.captured_layers.add(layer)
                value = (x[:, -1, :] if capture.positions == "last" else x).detach()
                if view is not None:      # the layer ran on the distinct rows: give every row its copy
                    value = value.index_select(0, view.inverse.to(value.device))
                capture.neurons[layer] = value
            return result
        return hook


def _rows_of(compiled: _Compiled, table: torch.Tensor, view: RowView | None) -> torch.Tensor:
    """The rows of a per-row plan table that the running batch holds."""
    if view is None or compiled.rows == 1:
        return table
    return table.index_select(0, view.keep.to(table.device))


def _check_rows(compiled: _Compiled, x: torch.Tensor, layer: int, view: RowView | None = None) -> None:
    if compiled.rows == 1:
        return
    if view is not None:
        if view.inverse.shape[0] != compiled.rows or x.shape[0] != view.keep.shape[0]:
            raise ValueError(f"layer {layer}: running {x.shape[0]} of {view.inverse.shape[0]} rows "
                             f"({view.keep.shape[0]} kept) but {compiled.rows} per-row plans were given")
        return
    if x.shape[0] != compiled.rows:
        raise ValueError(f"layer {layer}: the batch has {x.shape[0]} rows but {compiled.rows} per-row plans were given")


def _compile(arch: Architecture, plans: Plan | Sequence[Plan | None], capture: Capture | None) -> _Compiled:
    rows = [plans] if isinstance(plans, Plan) else [p if p is not None else Plan() for p in plans]
    if not rows:
        raise ValueError("no plans given: pass one Plan, or one Plan (or None) per batch row")
    heads: dict[int, torch.Tensor] = {}
    neuron_rows: dict[int, list[torch.Tensor]] = {}
    for r, plan in enumerate(rows):
        for layer, head in plan.heads:
            _check_index("layer", layer, arch.num_layers)
            _check_index(f"layer {layer} head", head, arch.num_heads)
            heads.setdefault(layer, torch.zeros(len(rows), arch.num_heads, dtype=torch.bool))[r, head] = True
        for edit in plan.neurons:
            _check_index("layer", edit.layer, arch.num_layers)
            index = torch.as_tensor(edit.neurons, dtype=torch.long)
            if index.numel() and (index.min() < 0 or index.max() >= arch.intermediate_size):
                raise ValueError(f"layer {edit.layer}: neuron indices must lie in [0, {arch.intermediate_size}); "
                                 f"got {index.min().item()}..{index.max().item()}")
            table = neuron_rows.setdefault(edit.layer, [torch.ones(arch.intermediate_size) for _ in rows])
            # out of place, so the gradient of a learned scale flows through
            table[r] = table[r].index_put((index,), table[r][index] * edit.multipliers().to(torch.float32))
    neurons = {layer: torch.stack(table) for layer, table in neuron_rows.items()}
    return _Compiled(rows=len(rows), heads=heads, neurons=neurons, capture=capture)


def _check_index(what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{what} {value} is out of range: this model has {size} (valid 0..{size - 1})")


@contextmanager
def intervene(arch: Architecture, plans: Plan | Sequence[Plan | None] = Plan(), *,
              capture: str | None = None) -> Iterator[Capture | None]:
    """Apply `plans` to every forward pass of `arch`'s model inside the block.

    Args:
        arch: the model's `Architecture`.
        plans: one `Plan` for every batch row, or a sequence with one `Plan` (or None) per row.
        capture: None, "last" or "all": record the FFN activations z (after scaling) of the
            first forward pass in the block (when generating: the prompt pass).

    Yields:
        The `Capture` when `capture` is set, else None.
    """
    if capture not in (None, "last", "all"):
        raise ValueError(f"capture must be None, 'last' or 'all', not {capture!r}")
    record = Capture(capture) if capture else None
    compiled = _compile(arch, plans, record)
    with _PLANS.open(arch.layers[0].o_proj, lambda: _Hooks(arch), compiled):
        yield record
