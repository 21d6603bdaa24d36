"""Sharing work between the rows of a batch: the vision tower, and the text decoder's prefix.

Rows that carry the same image share the vision tower: inside `share_images(arch)` the
tower runs once per distinct image (or tile) and duplicate rows get copies of its outputs.
So base and steered rows of one picture (the app), or retrieval candidates of one picture,
pay for the vision tower once. Duplicates are found with `torch.equal` on every per-row
input of the tower, never assumed; the rows actually run are exactly those of an unshared
run, minus the repeats, so every row's result is the one it gets alone up to float32
rounding (the tower runs on fewer rows, and BLAS picks kernels by shape, thread count and
CPU; see `share_images`).

Rows with the same input whose plans agree up to some layer share the text decoder up to
that layer: inside `share_prefix(arch)` each decoder layer of a prefill pass runs once per
group of rows whose inputs are bitwise equal and whose plans act alike at that layer
(`interventions.plan_classes`), and its outputs and KV-cache entries are copied back to
every row, so decoding steps run on the whole batch unchanged. The app's base and steered
rows share the layers before the first steered layer, head localization's (item, head of
layer l) rows share layers < l.

Rows under plans that act first at layer l share everything before l with the base pass:
`trace_layers(arch)` records every decoder layer's inputs (hidden states and the keyword
arguments the model gave it) in one base pass, and `run_from_layer` runs any rows from layer
l on from them, so head localization runs the vision tower and layers < l once per item for
all of its L x H head plans.

`share_rows` opens both blocks; `models.VLM` runs every batch of several rows inside it
(`VLM.sharing`). Both kinds of hooks follow `hooks.HookRegistry`: installed once per model
while any block is open, acting only for the threads/tasks inside a block.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch

from .arch import Architecture, get_module
from .errors import UnsupportedModelError
from .hooks import HookRegistry, RefCountedHooks, RowView, model_key, row_views, set_row_view
from .interventions import plan_classes


# ----- sharing the vision tower between rows with the same image ------------------------------------

# per context: the keys (`id(tower)`) of the towers this context shares
_TOWERS: HookRegistry[_TowerSharing] = HookRegistry("hones_shared_towers")


class _TowerSharing(RefCountedHooks):
    """The two hooks on one vision tower, installed while at least one `share_images` block is open.

    The pre-hook keeps the first of each group of equal rows and remembers, per thread, which
    kept row each input row maps to; the forward hook copies the outputs back to every row.
    Towers are not re-entrant, so one pending mapping per thread suffices.
    """

    def __init__(self, tower: torch.nn.Module):
        super().__init__(id(tower))
        self.tower = tower
        self.pending = threading.local()

    def install(self) -> list:
        return [self.tower.register_forward_pre_hook(self._before, with_kwargs=True),
                self.tower.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        self.pending.inverse = None
        if not _TOWERS.is_open(id(module)):
            return None
        if args and torch.is_tensor(args[0]):
            rows = args[0].shape[0]
        elif torch.is_tensor(kwargs.get("pixel_values")):
            rows = kwargs["pixel_values"].shape[0]
        else:
            raise UnsupportedModelError(f"{type(module).__name__} was called without a pixel tensor (positional or "
                                        "pixel_values=); cannot tell which rows carry the same image")
        per_row = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
        for value in per_row:
            if value.dim() == 0 or value.shape[0] != rows:
                raise UnsupportedModelError(
                    f"{type(module).__name__} got a tensor input of shape {tuple(value.shape)} next to {rows} image "
                    "rows; only towers whose tensor inputs are all one row per image can be shared")
        keep, inverse = _distinct_rows(per_row, rows, None)
        if len(keep) == rows:
            return None
        index = torch.tensor(keep, device=per_row[0].device)
        take = lambda v: v.index_select(0, index) if torch.is_tensor(v) else v   # noqa: E731
        self.pending.inverse = (torch.tensor(inverse), len(keep))
        return tuple(take(v) for v in args), {k: take(v) for k, v in kwargs.items()}

    def _after(self, module, args, output):
        pending, self.pending.inverse = getattr(self.pending, "inverse", None), None
        if pending is None:
            return None
        inverse, kept = pending
        return _spread(output, inverse, kept, type(module).__name__)


def _spread(value, inverse: torch.Tensor, kept: int, tower: str):
    """Copy every batch-first tensor in a tower's output from the kept rows back to all rows."""
    if value is None:
        return None
    if torch.is_tensor(value):
        if value.dim() == 0 or value.shape[0] != kept:
            raise UnsupportedModelError(f"{tower} returned a tensor of shape {tuple(value.shape)} for {kept} rows; "
                                        "only batch-first outputs can be shared between rows")
        return value.index_select(0, inverse.to(value.device))
    if isinstance(value, dict):      # ModelOutput included: assigning a key updates its attribute too
        for key in list(value.keys()):
            value[key] = _spread(value[key], inverse, kept, tower)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_spread(v, inverse, kept, tower) for v in value)
    raise UnsupportedModelError(f"{tower} returned a {type(value).__name__}; cannot share it between rows")


@contextmanager
def share_images(arch: Architecture) -> Iterator[None]:
    """Inside the block, the vision tower runs once per distinct image (or tile) of a batch.

    Rows are duplicates when every tensor input of the tower (pixels `[rows, C, H, W]`, and
    for Idefics3/SmolVLM the patch mask) is `torch.equal` row by row. Only distinct rows run;
    their outputs (every hidden state) are copied to the duplicates, and a batch of distinct
    images runs unchanged. A shared row's features are therefore those of the tower run on
    fewer rows: equal to the unshared batch up to float32 rounding (bitwise only where the
    kernels do not depend on the row count, which is the CPU's choice), and the same shapes as
    a single-image run; duplicate rows get exact copies. The
    text decoder is untouched (interventions act there only), so any per-row plans still apply.
    Families whose tower is not batch-first (Qwen2-VL, Qwen2.5-VL) run unshared.

    Thread-safe like `interventions.intervene` (`hooks.HookRegistry`): the hooks are installed
    once per tower while any block is open, and act only for the threads/tasks inside a block.
    """
    tower = arch.vision_tower
    if tower is None:
        yield
        return
    with _TOWERS.open(tower, lambda: _TowerSharing(tower)):
        yield


# ----- sharing the text decoder's prefix between rows that agree up to a layer ---------------------

# per context: the keys (`hooks.model_key`) of the models whose decoder prefix this context shares
_PREFIXES: HookRegistry[_PrefixSharing] = HookRegistry("hones_shared_prefix")

# keyword arguments of a decoder layer that hold one row per batch row (or one row for all), and the
# numbers of dimensions they may have: masks `[B, S]` (flash) or `[B, 1, Q, K]`, positions `[B, S]`,
# rotary (cos, sin) `[B, S, D]` (Qwen2-VL / 2.5-VL included: their 3-D mrope positions are folded into
# cos/sin before the layers, which get 2-D text positions)
_ROW_KWARGS = {"attention_mask": (2, 4), "position_ids": (2,), "position_embeddings": (3,)}
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _decoder_layers(arch: Architecture) -> list[torch.nn.Module]:
    """The text decoder layer modules of `arch`, checked against its o_proj list and cache indices."""
    path = arch.family.layers
    if not path.startswith("model."):
        raise UnsupportedModelError(f"{arch.family.name}: decoder layers at '{path}' are not inside the base model")
    layers = list(get_module(arch.base_model, path[len("model."):], "the text decoder layers"))
    for i, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if getattr(attention, "o_proj", None) is not arch.layers[i].o_proj or getattr(attention, "layer_idx", i) != i:
            raise UnsupportedModelError(f"{arch.family.name}: decoder layer {i} does not hold o_proj {i} or does "
                                        "not cache under its own index; its prefix cannot be shared")
    return layers


def _fresh_cache(cache, index: int) -> bool:
    """Whether layer `index` of `cache` is an empty dynamic layer (it then receives exactly this call's keys)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if cache is None:
        return True
    if type(cache) is not DynamicCache or getattr(cache, "offloading", True):
        return False
    kinds = (DynamicLayer, DynamicSlidingWindowLayer)
    if index < len(cache.layers):
        layer = cache.layers[index]
        return type(layer) in kinds and layer.get_seq_length() == 0
    return getattr(cache, "layer_class_to_replicate", None) in kinds


def _row_kwargs(kwargs: dict, rows: int, where: str) -> list[torch.Tensor]:
    """The per-row tensors among a decoder layer's keyword arguments; refuses any it cannot place."""
    per_row: list[torch.Tensor] = []
    for name, value in kwargs.items():
        if name in _CACHE_KWARGS or value is None or isinstance(value, (bool, int, float, str)):
            continue
        if name not in _ROW_KWARGS:
            raise UnsupportedModelError(f"{where} got a keyword argument {name!r} ({type(value).__name__}); "
                                        "cannot tell whether it holds one row per batch row")
        leaves = list(value) if isinstance(value, (tuple, list)) else [value]
        for leaf in leaves:
            if not torch.is_tensor(leaf) or leaf.dim() not in _ROW_KWARGS[name] or leaf.shape[0] not in (1, rows):
                shape = tuple(leaf.shape) if torch.is_tensor(leaf) else type(leaf).__name__
                raise UnsupportedModelError(f"{where} got {name} {shape} for {rows} rows; expected a batch-first "
                                            f"tensor with {' or '.join(map(str, _ROW_KWARGS[name]))} dimensions")
            if leaf.shape[0] == rows:
                per_row.append(leaf)
    return per_row


_CHECKSUM_SAMPLES = 4096


def _checksums(tensor: torch.Tensor) -> list[int]:
    """A cheap exact integer checksum of each row, over an evenly strided sample of its values.

    Equal rows always get equal numbers (integer sums of the same bits); rows that differ only
    outside the sample share a number and are told apart by `torch.equal`.
    """
    flat = tensor.reshape(tensor.shape[0], -1)
    flat = flat[:, ::max(1, flat.shape[1] // _CHECKSUM_SAMPLES)].contiguous()
    if flat.is_floating_point():
        bits = {4: torch.int32, 2: torch.int16, 8: torch.int64}.get(flat.element_size())
        if bits is None:
            return [0] * tensor.shape[0]
        flat = flat.view(bits)
    return flat.sum(1, dtype=torch.int64).tolist()


def _distinct_rows(tensors: list[torch.Tensor], rows: int, classes: list[int] | None = None
                   ) -> tuple[list[int], list[int]]:
    """Rows to run (the first of each group of exactly equal rows) and, per row, its index among them.

    Rows are equal when every tensor is `torch.equal` row by row and (with `classes`) their
    classes agree; checksums of the first tensor pick the candidates, so each row is compared
    with the few kept rows of the same checksum only.
    """
    keep: list[int] = []
    inverse: list[int] = []
    buckets: dict[tuple, list[int]] = {}
    sums = _checksums(tensors[0])
    for row in range(rows):
        candidates = buckets.setdefault((classes[row] if classes is not None else 0, sums[row]), [])
        for j in candidates:
            if all(torch.equal(t[row], t[keep[j]]) for t in tensors):
                inverse.append(j)
                break
        else:
            candidates.append(len(keep))
            inverse.append(len(keep))
            keep.append(row)
    return keep, inverse


def _take(value, index: torch.Tensor, rows: int):
    """`value` with every batch-first tensor (leading size `rows`) restricted to the rows `index`."""
    if torch.is_tensor(value):
        return value.index_select(0, index.to(value.device)) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, index, rows) for v in value)
    return value


class _PrefixSharing(RefCountedHooks):
    """The hooks on one model's decoder layers, installed while at least one `share_prefix` block is open.

    Each layer's pre-hook decides, for a prefill call (more than one position, an empty dynamic
    cache layer) inside a block, which rows are distinct; the layer then runs on those rows, the
    interventions see a `RowView` so per-row plans and captures follow, and the forward hook
    copies the outputs and the layer's cached keys/values back to every row.
    """

    def __init__(self, arch: Architecture, layers: list[torch.nn.Module]):
        super().__init__(model_key(arch))
        self.arch = arch
        self.layers = layers
        self.pending = threading.local()

    def install(self) -> list:
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._before(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(self._after(index), with_kwargs=True))
        return handles

    def _before(self, index: int):
        def hook(module, args, kwargs):
            self.pending.value = None
            if not _PREFIXES.is_open(self.key):
                return None
            set_row_view(self.arch, None)
            positional = bool(args)
            hidden = args[0] if positional else kwargs.get("hidden_states")
            where = f"decoder layer {index} ({type(module).__name__})"
            if not torch.is_tensor(hidden) or hidden.dim() != 3:
                raise UnsupportedModelError(f"{where} was called without hidden states [batch, seq, hidden]")
            rows, seq = hidden.shape[:2]
            if rows < 2 or seq < 2:        # one row, or a decoding step (rows diverge): run unchanged
                return None
            if len(args) > 1:
                raise UnsupportedModelError(f"{where} got {len(args)} positional arguments; only the hidden states "
                                            "may be positional for its rows to be shared")
            cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
            if not _fresh_cache(cache, index):
                return None
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            per_row = [hidden, *_row_kwargs(extra, rows, where)]
            classes = plan_classes(self.arch, index, rows)
            if classes is not None and len(set(classes)) == rows:     # every row has its own plan here
                return None
            keep, inverse = _distinct_rows(per_row, rows, classes)
            if len(keep) == rows:
                return None
            kept = torch.tensor(keep, device=hidden.device)
            inverse_t = torch.tensor(inverse)
            set_row_view(self.arch, RowView(index, kept, inverse_t))
            self.pending.value = (index, inverse_t, len(keep), cache)
            new_kwargs = {k: (_take(v, kept, rows) if k in _ROW_KWARGS or k == "hidden_states" else v)
                          for k, v in kwargs.items()}
            return ((hidden.index_select(0, kept),) if positional else ()), new_kwargs
        return hook

    def _after(self, index: int):
        def hook(module, args, kwargs, output):
            pending, self.pending.value = getattr(self.pending, "value", None), None
            if pending is None:
                return None
            set_row_view(self.arch, None)
            layer_index, inverse, kept, cache = pending
            where = f"decoder layer {index} ({type(module).__name__})"
            if layer_index != index:
                raise RuntimeError(f"{where}: finished while layer {layer_index} was pending (layers re-entered?)")
            if cache is not None and index < len(cache.layers) and cache.layers[index].is_initialized:
                entry = cache.layers[index]
                for name in ("keys", "values"):
                    value = getattr(entry, name)
                    if value.shape[0] != kept:
                        raise UnsupportedModelError(f"{where} cached {name} of shape {tuple(value.shape)} for "
                                                    f"{kept} rows; cannot copy them back to every row")
                    setattr(entry, name, value.index_select(0, inverse.to(value.device)))
            return _spread(output, inverse, kept, where)
        return hook


@contextmanager
def share_prefix(arch: Architecture) -> Iterator[None]:
    """Inside the block, each decoder layer of a prefill pass runs once per distinct row.

    Rows are the same at layer k when the layer's inputs are bitwise equal (hidden states, and
    the row's attention mask and rotary positions, by `torch.equal`) and their plans act alike
    at layer k (same head mask and neuron multipliers, `interventions.plan_classes`). Rows that
    share the input and the plans of layers < k therefore share layers < k; from the first layer
    where their plans differ they run apart. The layer's outputs and its key/value cache entries
    are copied back to every row, so decoding steps (one position, where rows diverge) run
    unchanged on the whole batch, and captures (`intervene(..., capture=...)`) hold every row.

    Only prefill calls are shared: more than one position and an empty `DynamicCache` layer (or
    no cache); any other call runs unshared. A decoder layer given a keyword argument whose batch
    layout is unknown raises `UnsupportedModelError` rather than being guessed. Every row's result
    is the one it gets unshared up to float32 rounding (tested within 1e-5 for every family);
    bitwise only where the kernels give a row the same bits whatever the row count, which
    depends on the CPU. Whether duplicate rows even reach a layer with equal bits depends on the
    CPU too (MKL's AVX2 kernels round a row of one matrix product by its position): rows that do
    not are simply run apart.

    Thread-safe like `share_images`: hooks installed once per model while any block is open, and
    acting only for the threads/tasks inside a block.
    """
    layers = _decoder_layers(arch)
    with _PREFIXES.open(layers[0], lambda: _PrefixSharing(arch, layers)), row_views(arch):
        yield


@contextmanager
def share_rows(arch: Architecture) -> Iterator[None]:
    """`share_images` and `share_prefix` together: what every batched inference call runs inside."""
    with share_images(arch), share_prefix(arch):
        yield


# ----- starting a pass at a decoder layer: the base pass's layer inputs, kept --------------------------

class LayerTrace:
    """What every text decoder layer received in one pass over a batch (the base pass).

    A plan that acts first at layer l leaves the inputs of layers <= l as they were, so a row
    under such a plan can start at layer l from these inputs (`run_from_layer`) instead of
    running the vision tower and layers < l again.

    Attributes:
        hidden: per layer, its input hidden states `[rows, seq, hidden]`.
        kwargs: per layer, the keyword arguments the model gave it (masks, positions, rotary
            cos/sin, ...), as given: batch-first tensors hold one row per trace row, or one for all.
        norm: the text decoder's final norm (applied after the last layer).
    """

    def __init__(self, layers: int, keep: Collection[int] | None = None):
        self.hidden: list[torch.Tensor | None] = [None] * layers
        self.kwargs: list[dict | None] = [None] * layers
        self.norm: torch.nn.Module | None = None
        self.keep = None if keep is None else frozenset(keep)    # layers whose inputs are kept (None: all)
        self.seen: set[int] = set()
        self.batch = 0

    @property
    def rows(self) -> int:
        return self.batch

    @staticmethod
    def bytes_per_row(*, layers: int, tokens: int, hidden: int, bytes_per_value: int) -> int:
        """Hidden states kept per traced row with every layer kept: layers x tokens x hidden x dtype size."""
        return layers * tokens * hidden * bytes_per_value

    def nbytes(self) -> int:
        """Bytes held: the hidden states kept (`rows x seq x hidden x dtype size` per layer) and the kwargs tensors."""
        seen: dict[int, int] = {}
        for value in [*self.hidden, *(leaf for kw in self.kwargs for leaf in _leaves(kw))]:
            if torch.is_tensor(value):
                seen[id(value)] = value.numel() * value.element_size()
        return sum(seen.values())


def _leaves(kwargs: dict | None) -> list:
    out = []
    for value in (kwargs or {}).values():
        out.extend(value if isinstance(value, (tuple, list)) else [value])
    return out


# per context: the keys (`hooks.model_key`) of the models whose layer inputs this context records
_TRACES: HookRegistry[_Tracing] = HookRegistry("hones_layer_traces")


class _Tracing(RefCountedHooks):
    """Pre-hooks on one model's decoder layers that record their inputs into the context's `LayerTrace`."""

    def __init__(self, arch: Architecture, layers: list[torch.nn.Module]):
        super().__init__(model_key(arch))
        self.layers = layers

    def install(self) -> list:
        return [layer.register_forward_pre_hook(self._before(index), with_kwargs=True)
                for index, layer in enumerate(self.layers)]

    def _before(self, index: int):
        def hook(module, args, kwargs):
            trace = _TRACES.current(self.key)
            if trace is None:
                return None
            where = f"decoder layer {index} ({type(module).__name__})"
            hidden = args[0] if args else kwargs.get("hidden_states")
            if len(args) > 1 or not torch.is_tensor(hidden) or hidden.dim() != 3:
                raise UnsupportedModelError(f"{where} was not called with hidden states [batch, seq, hidden] as its "
                                            "only positional argument; its inputs cannot be kept to start there")
            if index in trace.seen:
                raise UnsupportedModelError(f"{where} ran twice in one traced pass (a cached decoding step?); "
                                            "trace a single forward pass without a KV cache")
            extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            cache = next((extra[k] for k in _CACHE_KWARGS if extra.get(k) is not None), None)
            if cache is not None:
                raise UnsupportedModelError(f"{where} got a KV cache in a traced pass; trace with use_cache=False")
            _row_kwargs(extra, hidden.shape[0], where)        # refuses any keyword whose batch layout is unknown
            trace.seen.add(index)
            trace.batch = int(hidden.shape[0])
            if trace.keep is None or index in trace.keep:
                trace.hidden[index] = hidden.detach()
            trace.kwargs[index] = extra
            return None
        return hook


def _final_norm(arch: Architecture) -> torch.nn.Module:
    """The text decoder's final norm: `norm` next to the decoder layers (every supported family)."""
    parent = arch.family.layers.rsplit(".", 1)[0]
    text_model = get_module(arch.base_model, parent[len("model."):], "the text decoder") if parent != "model" \
        else arch.base_model
    norm = getattr(text_model, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise UnsupportedModelError(f"{arch.family.name}: no final norm at '{parent}.norm'; passes cannot start "
                                    "at a decoder layer for this model")
    return norm


@contextmanager
def trace_layers(arch: Architecture, keep: Collection[int] | None = None) -> Iterator[LayerTrace]:
    """Inside the block, the next forward pass records every decoder layer's inputs in the yielded trace.

    Run exactly one forward pass without a KV cache (`use_cache=False`) inside the block; the
    trace is complete when every layer has run once. Thread-safe like `share_prefix`.

    Args:
        keep: the layers whose input hidden states are kept (default all; each costs
            `[rows, seq, hidden]`); keyword arguments (masks, rotary) are kept for every layer.

    Raises:
        UnsupportedModelError: a layer is called in a way whose rows cannot be told apart, or twice.
    """
    layers = _decoder_layers(arch)
    trace = LayerTrace(len(layers), keep)
    trace.norm = _final_norm(arch)
    with _TRACES.open(layers[0], lambda: _Tracing(arch, layers), trace):
        yield trace
    missing = [i for i in range(len(layers)) if i not in trace.seen]
    if missing:
        raise UnsupportedModelError(f"decoder layers {missing} did not run inside trace_layers; run one full "
                                    "forward pass of the model inside the block")


def run_from_layer(arch: Architecture, trace: LayerTrace, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """The text decoder's output (after its final norm) for trace rows `rows`, starting at decoder layer `layer`.

    Args:
        trace: a base pass (`trace_layers`).
        layer: the first layer to run; layers < layer are taken from the trace as they were.
        rows: long `[R]`, which trace row each output row starts from (repeats allowed: one row per
            plan). Plans (`interventions.intervene`, one per output row) act on layers >= `layer`;
            a plan acting on an earlier layer would be silently wrong, so callers start at its first layer.

    Returns:
        `[R, seq, hidden]` final hidden states, equal to a full pass up to float rounding (other
        batch shapes than the traced pass; bitwise where the kernels do not depend on them).
    """
    layers = _decoder_layers(arch)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: this model has {len(layers)} decoder layers")
    if trace.hidden[layer] is None:
        raise ValueError(f"the trace did not keep the inputs of layer {layer} (kept: {sorted(trace.keep or [])}); "
                         "trace with keep including it")
    index = rows.to(trace.hidden[layer].device)
    hidden = trace.hidden[layer].index_select(0, index)
    for k in range(layer, len(layers)):
        kwargs = {name: (_take(value, index, trace.rows) if name in _ROW_KWARGS else value)
                  for name, value in trace.kwargs[k].items()}
        out = layers[k](hidden, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return trace.norm(hidden)
