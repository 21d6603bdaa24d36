"""Where things live inside each supported vision-language model family.

Every family difference is one row of `FAMILIES`: the dotted path from the top-level
model to the text decoder layers, the path to the vision tower (when its input is one
image or tile per batch row, so rows with the same image can share it), whether its
processor wants one list of images per prompt, and whether the processor's outputs are
batch-first (one row per prompt, so rows can be copied between batches). Inside a decoder layer all supported
families agree (`self_attn.o_proj`, `mlp.gate_proj/up_proj/down_proj/act_fn`), and so do
the unembedding (`lm_head`) and the text config (`config.get_text_config()`). A model of
any other family gets `UnsupportedModelError`, never a guess.
"""

from __future__ import annotations

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


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", "llava", "model.language_model.layers",
           "llava-hf/llava-1.5-7b-hf, llava-hf/llava-interleave-qwen-0.5b-hf", vision="model.vision_tower"),
    Family("llava-onevision", "llava_onevision", "model.language_model.layers",
           "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", vision="model.vision_tower"),
    # Qwen2-VL / Qwen2.5-VL: the processor's `pixel_values` hold the flattened patches of ALL images
    # concatenated (`[sum of patches, C*T*P*P]`, with `image_grid_thw`), not one image per row, and
    # `model.visual` takes them so: its tower is left unshared and its inputs are not batch-first.
    Family("qwen2-vl", "qwen2_vl", "model.language_model.layers", "Qwen/Qwen2-VL-2B-Instruct", vision=None,
           batch_first_inputs=False),
    Family("qwen2.5-vl", "qwen2_5_vl", "model.language_model.layers", "Qwen/Qwen2.5-VL-3B-Instruct", vision=None,
           batch_first_inputs=False),
    Family("idefics3", "idefics3", "model.text_model.layers", "HuggingFaceM4/Idefics3-8B-Llama3",
           vision="model.vision_model", nested_images=True),
    Family("smolvlm", "smolvlm", "model.text_model.layers", "HuggingFaceTB/SmolVLM-256M-Instruct",
           vision="model.vision_model", nested_images=True),
)}

# Paths inside one decoder layer, shared by every family above.
O_PROJ = "self_attn.o_proj"
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


class Architecture:
    """The text decoder of a loaded VLM, seen through one family's row of the table.

    Attributes:
        family: the `Family` row.
        layers: one `Layer` per text decoder layer, in order.
        num_heads, head_dim: query heads per layer and their width.
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
        text_config = model.config.get_text_config()
        self.num_heads = int(text_config.num_attention_heads)
        hidden = int(text_config.hidden_size)
        self.head_dim = int(getattr(text_config, "head_dim", None) or hidden // self.num_heads)
        self.intermediate_size = int(text_config.intermediate_size)
        decoder_layers = get_module(model, self.family.layers, "the text decoder layers")
        self.layers = [
            Layer(i, *(get_module(layer, path, f"layer {i} {path}")
                       for path in (O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ, ACT_FN)))
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

    def unembedding(self) -> torch.Tensor:
        """W_U, `[vocab, hidden]`."""
        return self.lm_head.weight

    def describe(self) -> dict:
        return {"family": self.family.name, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate_size}
