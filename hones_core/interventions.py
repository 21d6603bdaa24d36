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
  with a trainable tensor s. The product is taken in float32 and cast back to the model's
  dtype (in bfloat16, 1 + 0.003 rounds to 1: a small learned scale would do nothing), and
  only on the edited neurons' columns, so every other value is left bitwise as it was.

Captures (`intervene(..., capture=..., token_mask=...)`) record z after the plan's scaling
in the first forward pass: at the last position, at every position, and/or as per-layer
sums over the positions a token mask selects (`TokenStats`: how often z > 0 and Σ z, for
the activation-statistics baselines AP and MA), without keeping `[batch, seq, intermediate]`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .arch import Architecture
from .errors import UnsupportedModelError
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
class TokenStats:
    """Per-layer sums over the token positions a mask selects (padding left out).

    Attributes:
        positive: layer -> `[intermediate]` float64, the number of selected positions with z > 0.
        total: layer -> `[intermediate]` float64, Σ z over the selected positions.
        tokens: how many positions the mask selects (the same for every layer).
    """
    positive: dict[int, torch.Tensor] = field(default_factory=dict)
    total: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0


@dataclass
class Capture:
    """What an `intervene` block recorded: FFN activations z of the first forward pass.

    `neurons[layer]` is `[batch, intermediate]` at the last position when capturing "last",
    `[batch, seq, intermediate]` when capturing "all" (nothing when `positions` is None);
    `stats` holds the token-mask sums when a token mask was given. Values are after the
    plan's scaling.
    """
    positions: str | None
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    stats: TokenStats | None = None
    token_mask: torch.Tensor | None = None       # bool [batch, seq]: the positions `stats` sums over


@dataclass
class _Compiled:
    rows: int                                    # 1 = broadcast over the batch
    heads: dict[int, torch.Tensor]               # layer -> bool [rows, num_heads]
    neurons: dict[int, torch.Tensor]             # layer -> float32 [rows, edited]: multipliers of the edited columns
    columns: dict[int, torch.Tensor]             # layer -> long [edited]: the neurons some plan edits there
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
                x = _scaled(x, _rows_of(compiled, compiled.neurons[layer], view), compiled.columns[layer])
                result = (x, *args[1:])
            capture = compiled.capture
            if capture is not None and layer not in compiled.captured_layers:
                compiled.captured_layers.add(layer)
                if capture.positions is not None:
                    value = (x[:, -1, :] if capture.positions == "last" else x).detach()
                    if view is not None:      # the layer ran on the distinct rows: give every row its copy
                        value = value.index_select(0, view.inverse.to(value.device))
                    capture.neurons[layer] = value
                if capture.stats is not None:
                    _add_token_stats(capture, layer, x.detach(), view)
            return result
        return hook


def _scaled(x: torch.Tensor, table: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """z with the edited columns multiplied: x `[b, s, I]`, table `[rows, edited]`, columns `[edited]`.

    The product is taken in float32 and cast back to x's dtype: in bfloat16 1 + 0.003 is 1.0,
    so a small (learned) scale multiplied in the model's dtype would have no effect. Only the
    edited columns are cast, so the extra memory is `[b, s, edited]`, not `[b, s, I]`, and
    every other value is copied unchanged. Out of place, so gradients reach a learned scale.
    """
    columns = columns.to(x.device)
    part = x.index_select(2, columns).float() * table.to(x.device)[:, None, :]
    return x.index_copy(2, columns, part.to(x.dtype))


# elements of z that `token_sums` takes at a time: float32 copy, float32 counts and masked values
# (3 x 64 MiB) and a bool mask (16 MiB) at most, whatever the batch size
STATS_CHUNK = 1 << 24


def token_sums(x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ [z > 0] and Σ z over the positions `mask` selects, each `[I]` float64 on x's device.

    Args:
        x: FFN activations z, `[rows, seq, I]` (any float dtype).
        mask: `[rows, seq]`, nonzero at the positions to count (the attention mask: padding is 0).
        weights: `[rows]`, how many times each row counts (rows standing for several batch rows).

    Rows are taken a few at a time so the float32 temporaries stay near `STATS_CHUNK` elements
    whatever the batch size; each chunk's sums are float32 over at most `seq` values per row,
    then added in float64.
    """
    keep_all = mask.to(x.device) != 0
    positive = torch.zeros(x.shape[2], dtype=torch.float64, device=x.device)
    total = torch.zeros_like(positive)
    step = max(1, STATS_CHUNK // max(1, x.shape[1] * x.shape[2]))
    for start in range(0, x.shape[0], step):
        keep = keep_all[start:start + step, :, None]                               # [r, s, 1]
        z = x[start:start + step].float()                                          # [r, s, I]
        # counted in float32 (exact: at most `seq` per entry); summing the bool as is would make an
        # int64 copy of [r, s, I], twice the float32 one
        counts = (keep & (z > 0)).float().sum(1).double()                          # [r, I]
        # torch.where, not a product with the mask: padding positions may hold inf/NaN
        sums = torch.where(keep, z, 0.0).sum(1).double()                           # [r, I]
        if weights is not None:
            w = weights[start:start + step, None].to(x.device, torch.float64)
            counts, sums = counts * w, sums * w
        positive += counts.sum(0)
        total += sums.sum(0)
    return positive, total


def _add_token_stats(capture: Capture, layer: int, x: torch.Tensor, view: RowView | None) -> None:
    """Record layer `layer`'s `token_sums` over the capture's token mask in `capture.stats`.

    x is `[rows, seq, I]`, the rows that ran: with a row view, each kept row stands for as
    many batch rows as map to it, and counts that many times.
    """
    mask, weights = capture.token_mask, None
    if view is not None:
        mask = mask.index_select(0, view.keep.to(mask.device))
        weights = torch.bincount(view.inverse.cpu(), minlength=view.keep.shape[0])
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise UnsupportedModelError(
            f"layer {layer}: the FFN ran on {list(x.shape[:2])} (rows, positions) but the token mask is "
            f"{list(mask.shape)}; this model changes the sequence inside the decoder (e.g. expands image "
            "tokens itself), so token statistics cannot be matched to the attention mask")
    capture.stats.positive[layer], capture.stats.total[layer] = token_sums(x, mask, weights)


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
    edited: dict[int, set[int]] = {}
    for r, plan in enumerate(rows):
        if plan.heads and arch.num_heads < 2:
            # mean replacement puts the mean of the OTHER heads in a head's place: with one head there is none
            raise UnsupportedModelError(f"this model has {arch.num_heads} attention head per layer; mean-replacing "
                                        f"a head needs at least two (the others' mean takes its place), so heads "
                                        f"cannot be ablated or localized here — neuron plans still work")
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
            edited.setdefault(edit.layer, set()).update(index.tolist())
            # out of place, so the gradient of a learned scale flows through
            table[r] = table[r].index_put((index,), table[r][index] * edit.multipliers().to(torch.float32))
    neurons, columns = {}, {}
    for layer, table in neuron_rows.items():
        # the hook multiplies only the neurons some plan edits (also those with multiplier 1, e.g. a
        # learned scale still at 0: its gradient must flow)
        columns[layer] = torch.tensor(sorted(edited[layer]), dtype=torch.long)
        neurons[layer] = torch.stack(table).index_select(1, columns[layer])
    return _Compiled(rows=len(rows), heads=heads, neurons=neurons, columns=columns, capture=capture)


def _check_index(what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{what} {value} is out of range: this model has {size} (valid 0..{size - 1})")


@contextmanager
def intervene(arch: Architecture, plans: Plan | Sequence[Plan | None] = Plan(), *,
              capture: str | None = None, token_mask: torch.Tensor | None = None) -> Iterator[Capture | None]:
    """Apply `plans` to every forward pass of `arch`'s model inside the block.

    Args:
        arch: the model's `Architecture`.
        plans: one `Plan` for every batch row, or a sequence with one `Plan` (or None) per row.
        capture: None, "last" or "all": record the FFN activations z (after scaling) of the
            first forward pass in the block (when generating: the prompt pass).
        token_mask: `[batch, seq]` (the batch's `attention_mask`): also sum, per layer, how often
            z > 0 and Σ z over the positions where it is nonzero, in the first forward pass
            (`Capture.stats`). Costs 2 x `[intermediate]` float64 per layer, plus temporaries
            of about 13 bytes x `STATS_CHUNK` (~210 MiB) while a layer's sums are taken (`token_sums`).

    Yields:
        The `Capture` when `capture` or `token_mask` is set, else None.
    """
    if capture not in (None, "last", "all"):
        raise ValueError(f"capture must be None, 'last' or 'all', not {capture!r}")
    record = None
    if capture or token_mask is not None:
        record = Capture(capture)
        if token_mask is not None:
            if token_mask.dim() != 2:
                raise ValueError(f"token_mask must be [batch, seq], got shape {list(token_mask.shape)}")
            record.token_mask = token_mask.detach() != 0
            record.stats = TokenStats(tokens=int(record.token_mask.sum()))
    compiled = _compile(arch, plans, record)
    with _PLANS.open(arch.layers[0].o_proj, lambda: _Hooks(arch), compiled):
        yield record
