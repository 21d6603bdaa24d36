"""Tiny random vision-language models of every supported family, built offline.

Each builder makes a real transformers model class from a config (hidden size 32–64,
2 text layers), a byte-level BPE tokenizer trained on a few sentences with our own code,
an image processor built from parameters and a processor with a chat template in the
family's own style, and saves all of it with `save_pretrained`. Tests then load the
directory through `hones_core.models.load_vlm`, so the real loading code runs.
`train_tokenizer`, `make_chat_template` and `text_kwargs` are the building blocks, also
used for the random ~200M LLaVA of `benchmarks/app.py`.

Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llava", "llava-qwen2", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm")

_CORPUS = [
    "Question: What color is the circle?\nAnswer the question with a short phrase.",
    "Transcribe the text inside the blue box.\nOutput text only.",
    "Describe the image in one sentence.",
    "Candidate: a red circle and a green square.\nDoes the candidate correctly describe the image?",
    "Answer exactly Yes or No. Yes No yes no red green blue circle square triangle two three",
    "USER: ASSISTANT: User: Assistant: user assistant system",
]

def _lit(text: str) -> str:
    """A Jinja expression printing `text` verbatim (tags would eat surrounding whitespace)."""
    return "{{ " + repr(text) + " }}"


def make_chat_template(user_open: str, assistant_open: str, turn_close: str, generation_prompt: str,
                       image_marker: str) -> str:
    """A Jinja chat template in one family's style: images become `image_marker`, text is copied."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + _lit(user_open) + "{% else %}" + _lit(assistant_open) + "{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + _lit(image_marker) + "{% elif part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        + _lit(turn_close) + "{% endfor %}"
        "{% if add_generation_prompt %}" + _lit(generation_prompt) + "{% endif %}"
    )


def _qwen_style_template(image_marker: str) -> str:
    return make_chat_template("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n",
                              "<|im_start|>assistant\n", image_marker)


def train_tokenizer(specials: list[str], extra: dict[str, str], *, bos: str | None, eos: str,
                    pad: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a few sentences, with these special tokens.

    `extra` names special tokens the processor looks up (e.g. {"image_token": "<image>"}).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, extra_special_tokens=extra,
    )


def text_kwargs(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 96) -> dict:
    """Size keyword arguments of a Llama/Qwen2-style text config (tiny by default)."""
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=2048,
    )


def _build_llava(out: Path, text_family: str) -> None:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config,
                              SiglipImageProcessor, SiglipVisionConfig)

    if text_family == "llama":  # LLaVA-1.5: CLIP tower with a CLS token, Llama text model
        tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"},
                                    bos="<s>", eos="</s>", pad="<pad>")
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
        text = LlamaConfig(**text_kwargs(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        # LLaVA-1.5 style: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>"
        extra_tokens, template = 1, make_chat_template("USER: ", "ASSISTANT: ", " ", "ASSISTANT:", "<image>\n")
        select = "default"
    else:  # llava-interleave: SigLIP tower (no CLS token), Qwen2 text model
        tokenizer = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
                                    {"image_token": "<image>"}, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=8)
        text = Qwen2Config(**text_kwargs(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
        extra_tokens, template = 0, _qwen_style_template("<image>\n")
        select = "full"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=16, vision_feature_select_strategy=select, vision_feature_layer=-1)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy=select, num_additional_image_tokens=extra_tokens,
                               chat_template=template)
    _save(LlavaForConditionalGeneration(config), processor, out)


def _build_onevision(out: Path) -> None:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

    tokenizer = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                                {"image_token": "<image>", "video_token": "<video>"},
                                bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = Qwen2Config(**text_kwargs(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=config.image_grid_pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=_qwen_style_template("<image>\n"),
    )
    _save(LlavaOnevisionForConditionalGeneration(config), processor, out)


def _build_qwen_vl(out: Path, version: str) -> None:
    import transformers as tf

    names = {"2": ("Qwen2VL", "Qwen2VL"), "2.5": ("Qwen2_5_VL", "Qwen2VL")}[version]
    config_cls = getattr(tf, f"{names[0]}Config")
    model_cls = getattr(tf, f"{names[0]}ForConditionalGeneration")
    processor_cls = getattr(tf, f"{names[0]}Processor")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(specials, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                                bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in specials}
    # mrope sections must add up to head_dim / 2 (head_dim 16 here)
    text = dict(**text_kwargs(len(tokenizer)), pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    if version == "2.5":
        vision.update(intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1], window_size=32)
    else:
        vision.update(hidden_size=64)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    image_processor = tf.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, size=pixels)
    video_processor = tf.Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, size=pixels)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                              chat_template=_qwen_style_template("<|vision_start|><|image_pad|><|vision_end|>"))
    _save(model_cls(config), processor, out)


def _build_idefics3(out: Path, name: str = "Idefics3") -> None:
    """Idefics3, or SmolVLM (`name="SmolVLM"`: its own classes, the same tiling; its processor also
    takes a video processor and needs the `num2words` package)."""
    import transformers as tf

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<image>", "<global-img>", *(["<video>"] if name == "SmolVLM" else []), *grid]
    tokenizer = train_tokenizer(specials, {"image_token": "<image>"}, bos="<|im_start|>",
                                eos="<end_of_utterance>", pad="<|endoftext|>", vocab_size=480)
    vision = getattr(tf, f"{name}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=32, patch_size=8)
    text = tf.LlamaConfig(**text_kwargs(len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = getattr(tf, f"{name}Config")(vision_config=vision, text_config=text, scale_factor=2,
                                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    # (32 / 8)^2 patches, pixel-shuffled by scale 2 -> 4 image tokens per tile
    image_processor = getattr(tf, f"{name}ImageProcessor")(size={"longest_edge": 64},
                                                           max_image_size={"longest_edge": 32},
                                                           do_image_splitting=True)
    template = make_chat_template("User:", "Assistant: ", "<end_of_utterance>\n", "Assistant:", "<image>")
    extra = {}
    if name == "SmolVLM":
        extra["video_processor"] = tf.SmolVLMVideoProcessor(size={"longest_edge": 32},
                                                            max_image_size={"longest_edge": 32})
    processor = getattr(tf, f"{name}Processor")(image_processor=image_processor, tokenizer=tokenizer,
                                                image_seq_len=4, chat_template=template, **extra)
    _save(getattr(tf, f"{name}ForConditionalGeneration")(config), processor, out)


def _save(model: torch.nn.Module, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_vlm(family: str, out: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny random VLM of `family` (one of FAMILIES) in `out`; return the path."""
    out = Path(out)
    torch.manual_seed(seed)
    builders = {
        "llava": lambda: _build_llava(out, "llama"),
        "llava-qwen2": lambda: _build_llava(out, "qwen2"),
        "llava-onevision": lambda: _build_onevision(out),
        "qwen2-vl": lambda: _build_qwen_vl(out, "2"),
        "qwen2.5-vl": lambda: _build_qwen_vl(out, "2.5"),
        "idefics3": lambda: _build_idefics3(out),
        "smolvlm": lambda: _build_idefics3(out, "SmolVLM"),
    }
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    builders[family]()
    return out
