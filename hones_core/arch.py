"""Where things live inside each supported vision-language model family.

Every family difference is one row of `FAMILIES`: the dotted path from the top-level
model to the text decoder layers, the path to the vision tower (when its input is one
image or tile per batch row, so rows with the same image can share it), whether its
processor wants one list of images per prompt, and whether the processor's outputs are
batch-first (one row per prompt, so rows can be copied between batches). Inside a decoder layer all supported
families agree (`self_attn.o_proj`, `mlp.gate_proj/up_proj/down_proj/act_fn`), and so do
the unembedding (`lm_head`) and the text config (`config.get_text_config()`). A model of
any other family gets `UnsupportedModelError`, never a guess.

Where the image tokens sit is a family fact too (`Family.image_layout`, `image_regions`): which
positions of a prompt are image tokens, and which grid cell of which part of the picture each
stands for (LLaVA's patch grid, Idefics3 / SmolVLM tiles + the global image after pixel shuffle,
Qwen-VL's merged dynamic grid, OneVision's base grid + unpadded high-res grid with newline
tokens). It is read off the processor's outputs and the config, and checked against the number
of image tokens the prompt holds.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str                 # our name, shown to users
    model_type: str           # `config.model_type` of the top-level model
    layers: str               # dotted path from the top-level model to the decoder layers
    examples: str             # public checkpoints of this family, for messages and docs
    # dotted path to the vision tower, when it takes `[images_or_tiles, ...]` pixels (one image or
    # tile per row of dim 0) and returns batch-first outputs; None: not shared (see `sharing.share_images`)
    vision: str | None = None
    nested_images: bool = False   # processor wants `[[img], [img], ...]`
    # every tensor the processor returns has one row per prompt on dim 0; False: some tensor packs
    # all images together (then repeated rows cannot be processed once and copied)
    batch_first_inputs: bool = True
    # how image tokens map to parts of the picture: a key of `IMAGE_LAYOUTS`
    image_layout: str = "patch-grid"


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", "llava", "model.language_model.layers",
           "llava-hf/llava-1.5-7b-hf, llava-hf/llava-interleave-qwen-0.5b-hf", vision="model.vision_tower"),
    Family("llava-onevision", "llava_onevision", "model.language_model.layers",
           "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", vision="model.vision_tower", image_layout="anyres"),
    # Qwen2-VL / Qwen2.5-VL: the processor's `pixel_values` hold the flattened patches of ALL images
    # concatenated (`[sum of patches, C*T*P*P]`, with `image_grid_thw`), not one image per row, and
    # `model.visual` takes them so: its tower is left unshared and its inputs are not batch-first.
    Family("qwen2-vl", "qwen2_vl", "model.language_model.layers", "Qwen/Qwen2-VL-2B-Instruct", vision=None,
           batch_first_inputs=False, image_layout="merged-grid"),
    Family("qwen2.5-vl", "qwen2_5_vl", "model.language_model.layers", "Qwen/Qwen2.5-VL-3B-Instruct", vision=None,
           batch_first_inputs=False, image_layout="merged-grid"),
    Family("idefics3", "idefics3", "model.text_model.layers", "HuggingFaceM4/Idefics3-8B-Llama3",
           vision="model.vision_model", nested_images=True, image_layout="tiles"),
    Family("smolvlm", "smolvlm", "model.text_model.layers", "HuggingFaceTB/SmolVLM-256M-Instruct",
           vision="model.vision_model", nested_images=True, image_layout="tiles"),
)}

# Paths inside one decoder layer, shared by every family above.
O_PROJ = "self_attn.o_proj"
SELF_ATTN, Q_PROJ, K_PROJ = "self_attn", "self_attn.q_proj", "self_attn.k_proj"
GATE_PROJ, UP_PROJ, DOWN_PROJ, ACT_FN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn"


def supported_families() -> str:
    return "; ".join(f"{f.name} (model_type {f.model_type!r}, e.g. {f.examples})" for f in FAMILIES.values())


def get_module(root: nn.Module, path: str, what: str) -> nn.Module:
    """The submodule of `root` at dotted `path`; `UnsupportedModelError` naming `what` and the missing part."""
    node = root
    for part in path.split("."):
        if not hasattr(node, part):
            raise UnsupportedModelError(
                f"could not find {what} at '{path}' in {type(root).__name__} (missing '{part}'). "
                f"Supported families: {supported_families()}."
            )
        node = getattr(node, part)
    return node


@dataclass(frozen=True, eq=False)
class Layer:
    """One text decoder layer's intervention points."""
    index: int
    o_proj: nn.Linear      # input [batch, seq, num_heads * head_dim]
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear   # input z = act(gate(x)) * up(x), [batch, seq, intermediate]
    act_fn: nn.Module
    self_attn: nn.Module | None = None   # called with keywords hidden_states, position_embeddings (cos, sin)
    q_proj: nn.Linear | None = None      # output [batch, seq, num_heads * head_dim]
    k_proj: nn.Linear | None = None      # output [batch, seq, num_kv_heads * head_dim]


class Architecture:
    """The text decoder of a loaded VLM, seen through one family's row of the table.

    Attributes:
        family: the `Family` row.
        layers: one `Layer` per text decoder layer, in order.
        num_heads, head_dim: query heads per layer and their width.
        num_kv_heads: key/value heads per layer (grouped-query attention: query head h reads kv head
            h // (num_heads // num_kv_heads)).
        config: the top-level model config.
        intermediate_size: FFN neurons per layer.
        lm_head: the unembedding, weight `[vocab, hidden]`.
        vision_tower: the family's batch-first vision tower, or None where it is not one (Qwen-VL).
        batch_first_inputs: whether every processor output has one row per prompt (False: Qwen-VL).
        base_model: the model without `lm_head`; its output is the last hidden state.
    """

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({type(model).__name__}) is not supported. "
                f"Supported families: {supported_families()}."
            )
        self.family = FAMILIES[model_type]
        self.config = model.config
        text_config = model.config.get_text_config()
        self.num_heads = int(text_config.num_attention_heads)
        self.num_kv_heads = int(getattr(text_config, "num_key_value_heads", None) or self.num_heads)
        hidden = int(text_config.hidden_size)
        self.head_dim = int(getattr(text_config, "head_dim", None) or hidden // self.num_heads)
        self.intermediate_size = int(text_config.intermediate_size)
        decoder_layers = get_module(model, self.family.layers, "the text decoder layers")
        self.layers = [
            Layer(i, *(get_module(layer, path, f"layer {i} {path}")
                       for path in (O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ, ACT_FN, SELF_ATTN, Q_PROJ, K_PROJ)))
            for i, layer in enumerate(decoder_layers)
        ]
        self.lm_head = get_module(model, "lm_head", "the unembedding")
        self.vision_tower = get_module(model, self.family.vision, "the vision tower") if self.family.vision else None
        self.base_model = get_module(model, "model", "the base model (vision tower + text decoder, no lm_head)")
        self._check_shapes()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_first_inputs(self) -> bool:
        """Whether every tensor the processor returns is `[prompts, ...]` (rows may be copied)."""
        return self.family.batch_first_inputs

    def _check_shapes(self) -> None:
        width = self.num_heads * self.head_dim
        for layer in self.layers:
            if layer.o_proj.in_features != width:
                raise UnsupportedModelError(
                    f"layer {layer.index} o_proj takes {layer.o_proj.in_features} features, but the text config "
                    f"says {self.num_heads} heads x {self.head_dim} = {width}"
                )
            if layer.down_proj.in_features != self.intermediate_size:
                raise UnsupportedModelError(
                    f"layer {layer.index} down_proj takes {layer.down_proj.in_features} features, but the text "
                    f"config says intermediate_size {self.intermediate_size}"
                )

    def image_regions(self, inputs: Mapping, *, row: int, image_size: tuple[int, int], processor
                      ) -> list[ImageRegion]:
        """The image-token layout of batch row `row` (see `image_regions`)."""
        return image_regions(self.config, processor, inputs, row=row, image_size=image_size)

    def rotary(self, layer: int) -> Callable:
        """The function layer `layer`'s attention applies its rotary embedding with.

        `apply_rotary_pos_emb(q, k, cos, sin)` of the module's own modeling file (`q` `[b, heads, s, d]`,
        `cos`/`sin` `[b, s, d]` as the decoder passes them in `position_embeddings`; Qwen-VL's mrope
        sections are already merged into them by its rotary embedding).

        Raises:
            UnsupportedModelError: the attention module's file has no such function, or the attention
                does more than rotary + scaled dot product (q/k norms, a sliding window).
        """
        attn = self.layers[layer].self_attn
        fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        extra = [name for name in ("q_norm", "k_norm") if hasattr(attn, name)]
        if getattr(attn, "sliding_window", None):
            extra.append("sliding_window")
        if fn is None or extra:
            raise UnsupportedModelError(
                f"layer {layer} attention ({type(attn).__name__}) "
                + (f"uses {', '.join(extra)}" if extra else "has no apply_rotary_pos_emb in its module")
                + "; attention weights can only be read for rotary scaled-dot-product attention. "
                  f"Supported families: {supported_families()}.")
        return fn

    def unembedding(self) -> torch.Tensor:
        """W_U, `[vocab, hidden]`."""
        return self.lm_head.weight

    def describe(self) -> dict:
        return {"family": self.family.name, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate_size}


# ----- where the image tokens sit -----------------------------------------------------------------

@dataclass(frozen=True)
class ImageRegion:
    """One grid of image tokens: where its tokens are in the prompt and which part of the image each covers.

    Attributes:
        name: "image", "tile 1,2" (row 1, column 2), "global image", "base image", "high-res image".
        view: regions of one view tile the picture without overlapping ("image", "tiles", "global",
            "base", "high-res"); a figure draws each view once.
        positions: sequence positions of the grid's tokens, row-major, `rows * cols` of them.
        rows, cols: the grid's shape.
        box: (left, top, right, bottom) in pixels of the image given to the processor that the grid
            covers (it may reach outside the image where the processor pads it).
        extra: positions of this region's image tokens that are no grid cell (OneVision's row-end
            newline tokens, a CLS token kept by the "full" feature strategy).
    """
    name: str
    view: str
    positions: tuple[int, ...]
    rows: int
    cols: int
    box: tuple[float, float, float, float]
    extra: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.positions) != self.rows * self.cols:
            raise ValueError(f"{self.name}: {len(self.positions)} positions for a {self.rows}x{self.cols} grid")


def _size(size, key: str):
    """`size[key]` of an image processor's size (a dict or transformers' SizeDict), None when unset."""
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _layout_error(config, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{config.model_type}: the image tokens do not match the layout the config "
                                 f"describes ({what}); the processor and the model config disagree")


def _image_positions(config, inputs: Mapping, row: int) -> list[int]:
    ids = inputs["input_ids"][row]
    positions = (ids == int(config.image_token_id)).nonzero()[:, 0].tolist()
    if not positions:
        raise ValueError(f"row {row} of the batch holds no image token (id {config.image_token_id})")
    return positions


def _patch_grid(config, processor, inputs: Mapping, row: int, image_size: tuple[int, int]) -> list[ImageRegion]:
    """LLaVA: one grid of vision patches (pixel side / patch side), CLS dropped by the "default" strategy."""
    positions = _image_positions(config, inputs, row)
    height, width = inputs["pixel_values"].shape[-2:]
    patch = int(config.vision_config.patch_size)
    rows, cols = int(height) // patch, int(width) // patch
    extra = len(positions) - rows * cols        # the tower's CLS token, kept by the "full" strategy
    if extra not in (0, 1) or (extra and config.vision_feature_select_strategy != "full"):
        raise _layout_error(config, f"{len(positions)} image tokens for a {rows}x{cols} patch grid")
    return [ImageRegion("image", "image", tuple(positions[extra:]), rows, cols,
                        _processed_box(processor.image_processor, image_size), tuple(positions[:extra]))]


def _processed_box(image_processor, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of the original image a CLIP/SigLIP-style processor keeps: padded to a square
    (`do_pad`, LLaVA's own processor), resized by its shortest edge and centre-cropped, or resized whole."""
    width, height = image_size
    left, top, right, bottom = 0.0, 0.0, float(width), float(height)
    if getattr(image_processor, "do_pad", False):            # centred square of the longest side
        side = max(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        right, bottom = left + side, top + side
    crop = getattr(image_processor, "crop_size", None)
    shortest = _size(getattr(image_processor, "size", None) or {}, "shortest_edge")
    if getattr(image_processor, "do_center_crop", False) and crop is not None and shortest:
        w, h = right - left, bottom - top
        scale = shortest / min(w, h)                          # processed px per original px
        crop_w, crop_h = _size(crop, "width") / scale, _size(crop, "height") / scale
        cx, cy = (left + right) / 2, (top + bottom) / 2
        left, right = cx - min(crop_w, w) / 2, cx + min(crop_w, w) / 2
        top, bottom = cy - min(crop_h, h) / 2, cy + min(crop_h, h) / 2
    return (left, top, right, bottom)


def _merged_grid(config, processor, inputs: Mapping, row: int, image_size: tuple[int, int]) -> list[ImageRegion]:
    """Qwen2-VL / Qwen2.5-VL: the dynamic patch grid `image_grid_thw`, merged spatial_merge_size² to one token."""
    positions = _image_positions(config, inputs, row)
    t, h, w = (int(v) for v in inputs["image_grid_thw"][row])   # one image per prompt: row r is prompt r's
    merge = int(config.vision_config.spatial_merge_size)
    rows, cols = h // merge, w // merge
    if t != 1 or len(positions) != rows * cols:
        raise _layout_error(config, f"{len(positions)} image tokens for grid_thw {(t, h, w)} merged by {merge}")
    width, height = image_size
    return [ImageRegion("image", "image", tuple(positions), rows, cols, (0.0, 0.0, float(width), float(height)))]


_TILE_LABEL = re.compile(r"<row_(\d+)_col_(\d+)>|<global-img>")


def _tiles(config, processor, inputs: Mapping, row: int, image_size: tuple[int, int]) -> list[ImageRegion]:
    """Idefics3 / SmolVLM: square tiles of the image stretched to whole tiles, then the global image.

    Each run of image tokens is one tile's pixel-shuffled grid ((image_size / patch) / scale_factor
    per side, row-major); the text before the run names it (`<row_r_col_c>` or `<global-img>`).
    """
    positions = _image_positions(config, inputs, row)
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size) // int(config.scale_factor)
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append(positions[start:i])
            start = i
    ids = inputs["input_ids"][row].tolist()
    labels, previous_end = [], 0
    for run in runs:
        found = _TILE_LABEL.findall(processor.tokenizer.decode(ids[previous_end:run[0]]))
        if not found or len(run) != side * side:
            raise _layout_error(config, f"an image-token run of {len(run)} (expected {side}x{side}) "
                                        f"after {'no tile label' if not found else 'a tile label'}")
        labels.append(found[-1])
        previous_end = run[-1] + 1
    tiles = [(int(r), int(c)) for r, c in labels if r]
    n_rows, n_cols = (max(r for r, _ in tiles), max(c for _, c in tiles)) if tiles else (1, 1)
    width, height = image_size
    regions = []
    for run, (r, c) in zip(runs, labels):
        if r:
            r, c = int(r), int(c)
            box = ((c - 1) * width / n_cols, (r - 1) * height / n_rows, c * width / n_cols, r * height / n_rows)
            regions.append(ImageRegion(f"tile {r},{c}", "tiles", tuple(run), side, side, box))
        else:
            regions.append(ImageRegion("global image", "global", tuple(run), side, side,
                                       (0.0, 0.0, float(width), float(height))))
    if len(tiles) != (n_rows * n_cols if tiles else 0) or sum(r.view == "global" for r in regions) != 1:
        raise _layout_error(config, f"tiles {labels}")
    return regions


def _anyres(config, processor, inputs: Mapping, row: int, image_size: tuple[int, int]) -> list[ImageRegion]:
    """LLaVA-OneVision: the base image's grid, then the high-res grid (unpadded, downsampled past
    anyres_max_N tiles) with one newline token closing each row; shapes from the model's own helpers."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (get_anyres_image_grid_shape,
                                                                              unpad_image)

    positions = _image_positions(config, inputs, row)
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    original = [int(v) for v in inputs["image_sizes"][row]]               # (height, width)
    width, height = image_size
    whole = (0.0, 0.0, float(width), float(height))
    base = ImageRegion("base image", "base", tuple(positions[:side * side]), side, side, whole)
    rest = positions[side * side:]
    if inputs["pixel_values"][row].shape[0] == 1 or len(rest) == 1:      # base image only (+ one newline)
        if len(rest) != 1:
            raise _layout_error(config, f"{len(positions)} image tokens for a {side}x{side} base grid")
        return [ImageRegion(base.name, base.view, base.positions, side, side, whole, tuple(rest))]
    n_h, n_w = get_anyres_image_grid_shape(original, config.image_grid_pinpoints, config.vision_config.image_size)
    rows, cols = unpad_image(torch.empty(1, n_h * side, n_w * side), original).shape[1:]
    max_tiles = int(config.vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
    if ratio > 1.1:                              # the model interpolates the grid down to about N tiles
        rows, cols = int(rows // ratio), int(cols // ratio)
    if len(rest) != rows * (cols + 1):
        raise _layout_error(config, f"{len(rest)} high-res tokens for {rows} rows of {cols} cells + newline")
    grid = [p for i, p in enumerate(rest) if i % (cols + 1) != cols]
    newlines = [p for i, p in enumerate(rest) if i % (cols + 1) == cols]
    return [base, ImageRegion("high-res image", "high-res", tuple(grid), int(rows), int(cols), whole, tuple(newlines))]


# family.image_layout -> how to read its image tokens
IMAGE_LAYOUTS: dict[str, Callable] = {"patch-grid": _patch_grid, "merged-grid": _merged_grid, "tiles": _tiles,
                                      "anyres": _anyres}


def image_regions(config, processor, inputs: Mapping, *, row: int, image_size: tuple[int, int]) -> list[ImageRegion]:
    """Which image tokens of one prompt stand for which cells of which part of the picture.

    Args:
        config: the model's top-level config (its `model_type` picks the family's layout).
        processor: the model's processor (its image processor's crop, its tokenizer for tile labels).
        inputs: the processor's outputs for the batch (`input_ids` `[batch, seq]`, `pixel_values`,
            `image_grid_thw` / `image_sizes` where the family has them), one image per prompt.
        row: the batch row (prompt) to read.
        image_size: (width, height) of the image given to the processor, in pixels.

    Returns:
        The regions in the order their tokens appear; together they hold every image token of the row.

    Raises:
        UnsupportedModelError: an unsupported family, or image tokens that do not match the layout.
        ValueError: the row holds no image token.
    """
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UnsupportedModelError(f"model type {getattr(config, 'model_type', None)!r} is not supported. "
                                    f"Supported families: {supported_families()}.")
    regions = IMAGE_LAYOUTS[family.image_layout](config, processor, inputs, row, image_size)
    held = sorted(p for r in regions for p in (*r.positions, *r.extra))
    if held != _image_positions(config, inputs, row):
        raise _layout_error(config, "the regions do not hold every image token exactly once")
    return regions
