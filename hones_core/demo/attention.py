"""Where the heads look: the attention of the last prompt position over the image tokens.

`head_attention` runs one prompt pass per plan (base and steered rows in one batch, sharing
the vision tower and the decoder layers before the first steered layer, like `compute`) and
reads, for each chosen (layer, head), the attention weights of the last prompt position (the
one that predicts the first answer token) over every key position. They are computed from the
layer's own inputs as its attention does: q = q_proj(h) at the last position, k = k_proj(h) at
every position, both rotated by the layer's own `apply_rotary_pos_emb` with the cos/sin the
decoder hands it (Qwen-VL's mrope included), query head h reading kv head h // group (GQA),
softmax(q·kᵀ · scaling) over the non-padding positions in float32. The pass stops after the
last layer asked for. `arch.image_regions` then cuts the weights on image tokens into grids
(tiles, global image, base / high-res image), and `figure` draws them over the image.

Everything returned is plain data (numpy), so it can run inside a ZeroGPU child process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .. import plots
from ..arch import Architecture
from ..errors import DemoInputError
from ..hooks import HookRegistry, RefCountedHooks, model_key, row_view
from ..interventions import Plan, intervene
from ..models import VLM
from .request import Request


@dataclass
class RegionAttention:
    """The attention on one grid of image tokens (plain data).

    Attributes:
        name, view, rows, cols, box, positions: as `arch.ImageRegion` (box: (left, top, right, bottom)
            px; positions: the cells' token positions in the prompt, row-major).
        weights: `[plans, heads, rows, cols]` float32, attention of the last prompt position on each cell.
        extra: `[plans, heads]` float32, attention on the region's tokens that are no cell (newlines, CLS).
    """
    name: str
    view: str
    rows: int
    cols: int
    box: tuple[float, float, float, float]
    weights: np.ndarray
    extra: np.ndarray
    positions: tuple[int, ...] = ()


@dataclass
class HeadAttention:
    """What `head_attention` returns (plain data, picklable).

    Attributes:
        heads: the (layer, head) pairs, in the order of the weights' head axis.
        labels: one label per plan ("base", "steered"), the order of the plan axis.
        regions: the image's token grids, in prompt order.
        image_mass: `[plans, heads]` float32, total attention on every image token of the prompt.
        image_size: (width, height) of the image the model saw.
        prompt: the prompt whose last position is read.
    """
    heads: list[tuple[int, int]]
    labels: list[str]
    regions: list[RegionAttention]
    image_mass: np.ndarray
    image_size: tuple[int, int]
    prompt: str = ""

    def grid(self, *, plan: int, head: int, region: int = 0) -> np.ndarray:
        """`[rows, cols]` weights of one plan (index), head (index into `heads`) and region."""
        return self.regions[region].weights[plan, head]

    @property
    def views(self) -> list[str]:
        """The views, in prompt order ("image"; "tiles", "global"; "base", "high-res")."""
        return list(dict.fromkeys(r.view for r in self.regions))


class _Stop(Exception):
    """Raised by the attention hook after the last layer asked for: the rest of the pass is not needed."""


@dataclass
class _Wanted:
    heads: dict[int, list[int]]             # layer -> query heads
    key_mask: torch.Tensor                  # [rows, seq] bool, True at non-padding positions
    last: int
    weights: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [rows, len(heads), seq]


_ATTENTION: HookRegistry[_AttentionHooks] = HookRegistry("hones_head_attention")


class _AttentionHooks(RefCountedHooks):
    """Pre-hooks on every decoder layer's attention, installed while a `head_attention` call runs."""

    def __init__(self, arch: Architecture):
        super().__init__(model_key(arch))
        self.arch = arch

    def install(self) -> list:
        return [layer.self_attn.register_forward_pre_hook(self._hook(layer.index), with_kwargs=True)
                for layer in self.arch.layers]

    def _hook(self, index: int):
        arch = self.arch
        layer = arch.layers[index]
        group = arch.num_heads // arch.num_kv_heads

        def hook(module, args, kwargs):
            wanted = _ATTENTION.current(self.key)
            if wanted is None or index not in wanted.heads or index in wanted.weights:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]          # [rows, seq, hidden]
            cos, sin = kwargs["position_embeddings"]                        # [rows, seq, head_dim]
            rows, seq, _ = hidden.shape
            d = arch.head_dim
            rotate = arch.rotary(index)
            q = layer.q_proj(hidden[:, -1:]).view(rows, 1, arch.num_heads, d).transpose(1, 2)
            k = layer.k_proj(hidden).view(rows, seq, arch.num_kv_heads, d).transpose(1, 2)
            q, _ = rotate(q, q, cos[:, -1:], sin[:, -1:])                   # [rows, heads, 1, d]
            k, _ = rotate(k, k, cos, sin)                                   # [rows, kv_heads, seq, d]
            heads = torch.tensor(wanted.heads[index], device=q.device)
            q = q.index_select(1, heads).float()
            k = k.index_select(1, heads // group).float()                  # the kv head each query head reads
            scores = (q @ k.transpose(-1, -2))[:, :, 0, :] * float(module.scaling)   # [rows, n, seq]
            view = row_view(self.key, index)
            mask = wanted.key_mask if view is None else wanted.key_mask.index_select(0, view.keep.cpu())
            scores = scores.masked_fill(~mask[:, None, :].to(scores.device), float("-inf"))
            weights = torch.softmax(scores, dim=-1).cpu()
            if view is not None:          # the layer ran on the distinct rows: give every row its copy
                weights = weights.index_select(0, view.inverse)
            wanted.weights[index] = weights
            if index == wanted.last:
                raise _Stop
            return None
        return hook


def check_heads(arch: Architecture, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The heads as (layer, head) ints, each one that exists in the model, without repeats.

    Raises:
        DemoInputError: no head, or a head outside the model's layers × heads.
    """
    out = list(dict.fromkeys((int(l), int(h)) for l, h in heads))
    if not out:
        raise DemoInputError("Pick at least one head (layer, head) to see where it looks.")
    for l, h in out:
        if not (0 <= l < arch.num_layers and 0 <= h < arch.num_heads):
            raise DemoInputError(f"Head (layer {l}, head {h}) does not exist: this model has layers 0-"
                                 f"{arch.num_layers - 1} and heads 0-{arch.num_heads - 1} per layer.")
    return out


@torch.inference_mode()
def head_attention(vlm: VLM, request: Request, *, heads: Sequence[tuple[int, int]], plans: Sequence[Plan],
                   labels: Sequence[str] = ("base", "steered"), prompt_index: int = 0) -> HeadAttention:
    """Attention of the last prompt position over the image tokens, per head and plan.

    Args:
        vlm: the loaded model.
        request: the validated request (its image and prompts).
        heads: (layer, head) pairs, e.g. the task's top heads or a head the user picked.
        plans: one plan per row, e.g. `(Plan(), steered_plan)`; neuron edits in layers before a
            head's layer change what it attends to, edits at or after it do not.
        labels: one label per plan.
        prompt_index: which of the request's prompts (retrieval: which candidate).

    Returns:
        `HeadAttention`: per image region, `[plans, heads, rows, cols]` weights; each row's weights
        over all image tokens sum to `image_mass` (≤ 1, the rest is on text tokens).

    Raises:
        DemoInputError: a head that does not exist, or no plan.
        UnsupportedModelError: the model's attention or image layout is not one this reads.
    """
    arch = vlm.arch
    heads = check_heads(arch, heads)
    if not plans or len(labels) != len(plans):
        raise DemoInputError(f"Give one label per plan ({len(labels)} labels for {len(plans)} plans).")
    if not 0 <= prompt_index < len(request.prompts):
        raise DemoInputError(f"prompt_index {prompt_index} is out of range: the request has "
                             f"{len(request.prompts)} prompts.")
    n = len(plans)
    prompt = request.prompts[prompt_index]
    inputs = vlm.encode([request.image] * n, [prompt] * n).inputs
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    mask = inputs.get("attention_mask")
    key_mask = (torch.ones_like(inputs["input_ids"]) if mask is None else mask).bool().cpu()
    wanted = _Wanted(by_layer, key_mask, max(by_layer))
    try:
        with intervene(arch, list(plans)), vlm.sharing(n), \
                _ATTENTION.open(arch.layers[0].self_attn, lambda: _AttentionHooks(arch), wanted):
            vlm.last_hidden(inputs, use_cache=False)
    except _Stop:       # the hook stopped the pass after the deepest layer asked for (checked just below)
        pass
    missing = sorted(set(by_layer) - set(wanted.weights))
    if missing:
        raise RuntimeError(f"the attention of layers {missing} was never computed: their attention module was "
                           "not called with hidden_states and position_embeddings")
    # [plans, len(heads), seq], in the order of `heads`
    full = torch.stack([wanted.weights[l][:, by_layer[l].index(h)] for l, h in heads], dim=1)
    regions = arch.image_regions({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in inputs.items()},
                                 row=0, image_size=request.image.size, processor=vlm.processor)
    out = []
    for region in regions:
        cells = full[:, :, list(region.positions)].reshape(n, len(heads), region.rows, region.cols)
        extra = full[:, :, list(region.extra)].sum(-1) if region.extra else torch.zeros(n, len(heads))
        out.append(RegionAttention(region.name, region.view, region.rows, region.cols, region.box,
                                   cells.numpy().astype(np.float32), extra.numpy().astype(np.float32),
                                   region.positions))
    image_positions = sorted(p for r in regions for p in (*r.positions, *r.extra))
    mass = full[:, :, image_positions].sum(-1).numpy().astype(np.float32)
    return HeadAttention(heads, list(labels), out, mass, tuple(request.image.size), prompt)


def figure(attention: HeadAttention, image: Image.Image, *, head: int = 0, panel: int = 320
           ) -> tuple[Image.Image, str]:
    """Heatmaps of one head over the image: one column per plan (base | steered), one row per view.

    Args:
        attention: from `head_attention`.
        image: the image the model saw (`request.image`).
        head: index into `attention.heads`.
        panel: the longest side of each panel, px.

    Returns:
        (the picture, a one-line caption saying what it shows).
    """
    if not 0 <= head < len(attention.heads):
        raise DemoInputError(f"head index {head} is out of range: {len(attention.heads)} heads were computed.")
    layer, h = attention.heads[head]
    rows = []
    for view in attention.views:
        regions = [r for r in attention.regions if r.view == view]
        # one colour scale per view and head, shared by the plans, so base and steered compare; from the
        # smallest to the largest cell, since a near-uniform head would otherwise look flat
        top = max(float(r.weights[:, head].max()) for r in regions)
        bottom = min(float(r.weights[:, head].min()) for r in regions)
        rows.append([plots.attention_overlay(image, [r.weights[p, head] for r in regions], [r.box for r in regions],
                                             vmin=bottom, vmax=top, size=panel,
                                             title=f"{attention.labels[p]} · {_view_title(view)}")
                     for p in range(len(attention.labels))])
    picture = plots.image_grid(rows, title=f"Where layer {layer}, head {h} looks (last prompt position)")
    masses = ", ".join(f"{label} {attention.image_mass[p, head]:.0%}" for p, label in enumerate(attention.labels))
    caption = (f"Attention of the last prompt position (it predicts the first answer token) over the image "
               f"tokens, layer {layer} head {h}, one block per token, dark = the row's smallest weight, bright = its "
               f"largest (one scale per row, shared by {' and '.join(attention.labels)}); share of attention on image tokens: {masses}.")
    return picture, caption


def _view_title(view: str) -> str:
    return {"image": "image", "tiles": "tiles", "global": "global image", "base": "base image",
            "high-res": "high-res grid"}.get(view, view)
