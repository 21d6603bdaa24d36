"""Loading a vision-language model and running it the way HONES needs.

`load_vlm(name_or_path)` loads any supported family (see `arch.FAMILIES`) with
`AutoModelForImageTextToText` and `AutoProcessor`, from a Hub id or a local directory, and
returns a `VLM`: batched, left-padded inputs in the model's own chat template, greedy
generation, teacher-forced answer log-probabilities and next-token logits, each optionally
under an intervention plan (one per batch row).

How an answer follows a prompt is read off the chat template itself: the template is
rendered once with a placeholder assistant answer, which gives the separator between the
generation prompt and the answer (" " for LLaVA-1.5, "" for Qwen) and the end-of-turn
token. Teacher forcing therefore scores exactly the tokens generation would produce.

Rows that carry the same image share the vision tower: inside `share_images(arch)` the
tower runs once per distinct image (or tile) and duplicate rows get copies of its outputs.
`VLM.generate`, `next_token_logits` and `answer_logprobs` always run inside it, so base and
steered rows of one picture (the app), or retrieval candidates of one picture, pay for the
vision tower once. Duplicates are found with `torch.equal` on every per-row input of the
tower, never assumed; the rows actually run are exactly those of an unshared run, minus the
repeats, so every row's result is the one it gets alone up to float32 rounding (the tower runs
on fewer rows, and BLAS picks kernels by shape, thread count and CPU; see `share_images`).

Rows with the same input whose plans agree up to some layer share the text decoder up to
that layer: inside `share_prefix(arch)` each decoder layer of a prefill pass runs once per
group of rows whose inputs are bitwise equal and whose plans act alike at that layer, and
its outputs and KV-cache entries are copied back to every row, so decoding steps run on
the whole batch unchanged. The app's base and steered rows share the layers before the first
steered layer, head localization's (item, head of layer l) rows share layers < l.
`share_rows` opens both blocks; `VLM.generate`, `next_token_logits` and `answer_logprobs`
run batches of several rows inside it. Repeated (image, text) rows are also processed by
the processor only once (`VLM._process`).
"""

from __future__ import annotations

import contextvars
import functools
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .arch import Architecture, _get
from .errors import ModelLoadError, TemplateError, UnsupportedModelError
from .interventions import Plan, RefCountedHooks, RowView, intervene, model_key, plan_classes, row_views, set_row_view

ImageLike = Image.Image | str | Path
Plans = Plan | Sequence[Plan | None] | None

_PLACEHOLDER_PROMPT = "HONESPROMPT"
_PLACEHOLDER_ANSWER = "HONESANSWER"






@dataclass
class Encoded:
    """A batch ready for the model.

    Attributes:
        inputs: processor outputs on the model's device (`input_ids` `[batch, seq]`, pixels, ...).
        labels: `[batch, seq]` token ids at answer positions, -100 elsewhere (None without answers).
    """
    inputs: dict
    labels: torch.Tensor | None


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return names[dtype]


def load_vlm(name_or_path: str | Path, revision: str | None = None, device: str | None = None,
             dtype: str | torch.dtype = "auto", *, trust_remote_code: bool = False, device_map: str | None = None,
             max_memory: dict | None = None) -> VLM:
    """Load a supported VLM and its processor.

    Args:
        name_or_path: a Hub model id ("llava-hf/llava-1.5-7b-hf") or a local directory.
        revision: a branch, tag or commit of the Hub repo (ignored for local directories).
        device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available.
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or an explicit dtype.
        trust_remote_code: run code from the model repo; off unless you ask for it.
        device_map, max_memory: "auto" splits the model over the GPUs that `max_memory` lists
            (all visible ones when it is None), through transformers/accelerate; `device` must be None.

    Raises:
        ModelLoadError: the id/directory does not exist, is unreachable, or is not an image-text model.
        UnsupportedModelError: the model loaded but its family is not supported.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device_map is not None and device is not None:
        raise ValueError("give either device or device_map, not both")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
    source = str(name_or_path)
    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{source} is a file; pass the directory that holds config.json", model=source,
                             revision=revision)
    if not local.exists() and (local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1):
        raise ModelLoadError(f"no such model directory: {source} (and it is not a Hub id of the form org/name)",
                             model=source, revision=revision)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code, **placement)
        processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {source!r}{f' at revision {revision}' if revision else ''}: {err}\n"
            "Check the Hub id or the local directory (it needs config.json, weights and the processor files); "
            "without network, set HF_HUB_OFFLINE=1 and use a model already in the cache.",
            model=source, revision=revision) from err
    if device_map is None:
        model.to(device)
    model.eval()
    return VLM(model, processor, name=source, revision=revision)


# ----- sharing the vision tower between rows with the same image ------------------------------------

_SHARING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("hones_shared_towers", default=frozenset())


class _TowerSharing(RefCountedHooks):
    """The two hooks on one vision tower, installed while at least one `share_images` block is open.

    The pre-hook keeps the first of each group of equal rows and remembers, per thread, which
    kept row each input row maps to; the forward hook copies the outputs back to every row.
    Towers are not re-entrant, so one pending mapping per thread suffices.
    """

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower
        self.pending = threading.local()

    def install(self) -> list:
        return [self.tower.register_forward_pre_hook(self._before, with_kwargs=True),
                self.tower.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        self.pending.inverse = None
        if id(module) not in _SHARING.get():
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


_TOWERS: "weakref.WeakKeyDictionary[torch.nn.Module, _TowerSharing]" = weakref.WeakKeyDictionary()
_TOWERS_LOCK = threading.Lock()


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

    Thread-safe like `interventions.intervene`: the hooks are installed once per tower while
    any block is open, and act only for the threads/tasks inside a block.
    """
    tower = arch.vision_tower
    if tower is None:
        yield
        return
    with _TOWERS_LOCK:
        sharing = _TOWERS.get(tower)
        if sharing is None:
            sharing = _TOWERS[tower] = _TowerSharing(tower)
        sharing.acquire()
    token = _SHARING.set(_SHARING.get() | {id(tower)})
    try:
        yield
    finally:
        _SHARING.reset(token)
        with _TOWERS_LOCK:
            sharing.release()


# ----- sharing the text decoder's prefix between rows that agree up to a layer ---------------------

_PREFIX: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("hones_shared_prefix", default=frozenset())

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
    layers = list(_get(arch.base_model, path[len("model."):], "the text decoder layers"))
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
        super().__init__()
        self.arch = arch
        self.layers = layers
        self.key = model_key(arch)
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
            if self.key not in _PREFIX.get():
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


_PREFIXES: "weakref.WeakKeyDictionary[torch.nn.Module, _PrefixSharing]" = weakref.WeakKeyDictionary()
_PREFIXES_LOCK = threading.Lock()


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
    with _PREFIXES_LOCK:
        sharing = _PREFIXES.get(layers[0])
        if sharing is None:
            sharing = _PREFIXES[layers[0]] = _PrefixSharing(arch, layers)
        sharing.acquire()
    token = _PREFIX.set(_PREFIX.get() | {sharing.key})
    try:
        with row_views(arch):
            yield
    finally:
        _PREFIX.reset(token)
        with _PREFIXES_LOCK:
            sharing.release()


@contextmanager
def share_rows(arch: Architecture) -> Iterator[None]:
    """`share_images` and `share_prefix` together: what every batched inference call runs inside."""
    with share_images(arch), share_prefix(arch):
        yield


class VLM:
    """A loaded model + processor with the operations HONES needs.

    Attributes:
        model: the transformers model (eval mode).
        processor: its processor (tokenizer padding on the left).
        arch: where layers, heads and neurons are (`arch.Architecture`).
        name, revision: where it came from.
    """

    def __init__(self, model, processor, *, name: str = "", revision: str | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.arch = Architecture(model)
        self.name, self.revision = name, revision
        self._chat_prompts = functools.lru_cache(maxsize=4096)(self._render_chat_prompt)
        self._answer_ids = functools.lru_cache(maxsize=4096)(self._tokenize_answer)
        if getattr(processor, "chat_template", None) is None:
            raise TemplateError(f"{name}: the processor has no chat template; HONES prompts need one")
        self.answer_separator, self.stop_token_id = self._read_template()

    # ----- prompts and batches --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def chat_prompt(self, prompt: str) -> str:
        """The user turn (one image + `prompt`) in the model's chat template, ready for the answer.

        Rendered once per distinct prompt (a bounded, thread-safe cache): batches repeat prompts.
        """
        return self._chat_prompts(prompt)

    def _render_chat_prompt(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _read_template(self) -> tuple[str, int]:
        prompt = self.chat_prompt(_PLACEHOLDER_PROMPT)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PLACEHOLDER_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": _PLACEHOLDER_ANSWER}]},
        ]
        full = self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        eos = self.tokenizer.eos_token_id
        if not full.startswith(prompt) or _PLACEHOLDER_ANSWER not in full:
            warnings.warn(f"{self.name}: the chat template renders an assistant turn that does not extend the "
                          "generation prompt; answers are appended directly and end with the EOS token")
            return "", eos
        separator, suffix = full[len(prompt):].split(_PLACEHOLDER_ANSWER, 1)
        special = set(self.tokenizer.all_special_ids)
        stop = [t for t in self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if t in special]
        return separator, (stop[0] if stop else eos)

    def _images(self, images: Sequence[ImageLike]) -> list:
        """Images as the processor wants them; an image given for several rows is loaded once."""
        loaded: dict = {}
        out = [loaded[key] if key in loaded else loaded.setdefault(key, load_image(img))
               for key, img in ((_image_key(img), img) for img in images)]
        return [[img] for img in out] if self.arch.family.nested_images else out

    def _process(self, texts: list[str], images: Sequence[ImageLike]) -> dict:
        """Processor outputs for (text, image) rows on the model's device.

        Rows that repeat an earlier row (the same image object or path, the same text) are
        processed once and copied, for families whose processor outputs are all batch-first
        (one row per prompt); the result is what processing every row gives, since padding
        depends only on the longest row. Qwen2-VL / Qwen2.5-VL (patches of all images
        concatenated) process every row.
        """
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts; give one image per prompt")
        if not texts:
            raise ValueError("empty batch: give at least one (image, prompt) pair")
        first: dict = {}
        inverse = [first.setdefault((_image_key(img), text), len(first)) for img, text in zip(images, texts)]
        if len(first) == len(texts) or self.arch.family.vision is None:
            batch = self.processor(text=texts, images=self._images(images), padding=True, return_tensors="pt")
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        rows: list[int] = []          # the first row of each distinct (image, text), in order
        for i, j in enumerate(inverse):
            if j == len(rows):
                rows.append(i)
        batch = self.processor(text=[texts[i] for i in rows], images=self._images([images[i] for i in rows]),
                               padding=True, return_tensors="pt")
        index = torch.tensor(inverse)
        out = {}
        for key, value in batch.items():
            if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != len(rows):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise UnsupportedModelError(f"{self.name}: the processor returned {key} {shape} for {len(rows)} "
                                            "rows; only batch-first outputs can be copied to repeated rows")
            out[key] = value.index_select(0, index).to(self.device)
        return out

    def answer_token_ids(self, prompt: str, answer: str, *, with_stop: bool = False) -> list[int]:
        """The token ids the model emits for `answer` after the chat prompt of `prompt`."""
        ids = list(self._answer_ids(prompt, answer))
        return ids + [self.stop_token_id] if with_stop else ids

    def _tokenize_answer(self, prompt: str, answer: str) -> tuple[int, ...]:
        chat = self.chat_prompt(prompt)
        head = self.tokenizer(chat)["input_ids"]
        full = self.tokenizer(chat + self.answer_separator + answer)["input_ids"]
        if full[:len(head)] != head:
            raise TemplateError(
                f"{self.name}: tokenising prompt+answer changes the prompt's last tokens (answer {answer!r}); "
                "the answer cannot be scored exactly as generation would produce it")
        return tuple(full[len(head):])

    def encode(self, images: Sequence[ImageLike], prompts: Sequence[str],
               answers: Sequence[str] | None = None, *, with_stop: bool = False) -> Encoded:
        """Batch (image, prompt[, answer]) triples, left-padded; labels mark exactly the answer tokens."""
        chats = [self.chat_prompt(p) for p in prompts]
        if answers is None:
            return Encoded(self._process(chats, images), None)
        if len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        answer_ids = [self.answer_token_ids(p, a, with_stop=with_stop) for p, a in zip(prompts, answers)]
        stop = self.tokenizer.decode([self.stop_token_id]) if with_stop else ""
        texts = [c + self.answer_separator + a + stop for c, a in zip(chats, answers)]
        inputs = self._process(texts, images)
        ids = inputs["input_ids"]
        labels = torch.full_like(ids, -100)
        for row, target in enumerate(answer_ids):
            n = len(target)
            if n == 0:
                raise ValueError(f"answer {answers[row]!r} has no tokens")
            if ids[row, -n:].tolist() != target:
                raise TemplateError(f"{self.name}: the processed batch does not end with the answer tokens of row "
                                    f"{row}; the processor changed the text around the answer")
            labels[row, -n:] = ids[row, -n:]
        return Encoded(inputs, labels)

    # ----- running -----------------------------------------------------------------------------
    @staticmethod
    def _context(arch: Architecture, plans: Plans):
        return nullcontext() if plans is None else intervene(arch, plans)

    def sharing(self, rows: int):
        """`share_rows` for a batch of several rows; a single row has nothing to share (no hooks)."""
        return share_rows(self.arch) if rows > 1 else nullcontext()

    @torch.inference_mode()
    def generate(self, images: Sequence[ImageLike], prompts: Sequence[str], *, max_new_tokens: int = 24,
                 plans: Plans = None) -> list[str]:
        """Greedy answers, one per (image, prompt), special tokens removed and stripped."""
        inputs = self.encode(images, prompts).inputs
        with self._context(self.arch, plans), self.sharing(len(prompts)):
            out = self.model.generate(**inputs, **self.generation_kwargs(max_new_tokens))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def generation_kwargs(self, max_new_tokens: int) -> dict:
        stops = sorted({self.stop_token_id, self.tokenizer.eos_token_id} - {None})
        return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                    top_k=None, eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id)

    @torch.inference_mode()
    def next_token_logits(self, images: Sequence[ImageLike], prompts: Sequence[str], *,
                          plans: Plans = None) -> torch.Tensor:
        """Logits of the first answer token, `[batch, vocab]` float32."""
        inputs = self.encode(images, prompts).inputs
        with self._context(self.arch, plans), self.sharing(len(prompts)):
            hidden = self.last_hidden(inputs, use_cache=False)
        return self.unembed(hidden[:, -1:, :])[:, 0, :]

    def last_hidden(self, inputs: dict, *, use_cache: bool | None = None) -> torch.Tensor:
        """The text decoder's final hidden states, `[batch, seq, hidden]` (`use_cache=False`: no KV cache kept)."""
        extra = {} if use_cache is None else {"use_cache": use_cache}
        return self.arch.base_model(**inputs, **extra).last_hidden_state

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[batch, n, vocab]` float32 from hidden states `[batch, n, hidden]`.

        Computed one batch row at a time: BLAS picks other kernels for other row counts
        (M=1 vs M=2 differ in the last bits), so the LM head adds no dependence on the batch
        size (the layers before it may: rows agree with a run alone to float32 rounding).
        """
        return torch.stack([self.arch.lm_head(row) for row in hidden]).float()

    def answer_logprobs(self, images: Sequence[ImageLike], prompts: Sequence[str], answers: Sequence[str], *,
                        plans: Plans = None, reduction: str = "sum") -> torch.Tensor:
        """Teacher-forced log p(answer | image, prompt), `[batch]` ("sum" or "mean" over answer tokens)."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
        encoded = self.encode(images, prompts, answers)
        with torch.inference_mode(), self._context(self.arch, plans), self.sharing(len(prompts)):
            token_logp, mask = self.token_logprobs(encoded)
        total = (token_logp * mask).sum(-1)
        return total if reduction == "sum" else total / mask.sum(-1)

    def token_logprobs(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the labelled tokens: (`[batch, n]` values, `[batch, n]` 0/1 mask).

        Runs under the caller's grad mode and interventions, so training can backpropagate.
        """
        labels = encoded.labels
        if labels is None:
            raise ValueError("token_logprobs needs an Encoded batch built with answers")
        n = int((labels != -100).sum(-1).max())
        logits = self.unembed(self.last_hidden(encoded.inputs, use_cache=False)[:, -(n + 1):-1])
        targets = labels[:, -n:]
        mask = (targets != -100).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return logp * mask, mask

    def first_token_id(self, word: str) -> int:
        """The first token the model would emit for `word` right after the assistant prefix."""
        return self.answer_token_ids(_PLACEHOLDER_PROMPT, word)[0]

    def yes_no_ids(self) -> tuple[int, int]:
        """Token ids of "Yes" and "No" as first answer tokens; they must differ."""
        yes, no = self.first_token_id("Yes"), self.first_token_id("No")
        if yes == no:
            raise TemplateError(f"{self.name}: 'Yes' and 'No' start with the same token ({yes}); retrieval "
                                "scores logit(Yes) - logit(No) and cannot work with this tokenizer")
        return yes, no


def _image_key(image: ImageLike) -> tuple:
    """Rows carry the same image when they carry the same object or the same path."""
    return ("pil", id(image)) if isinstance(image, Image.Image) else ("path", str(image))


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as img:
        return img.convert("RGB")
