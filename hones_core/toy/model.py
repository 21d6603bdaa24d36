"""The toy VLM: a real `Idefics3ForConditionalGeneration`, small enough to train on a laptop CPU.

An Idefics3 vision tower (96x96 images, 16x16 patches, 3 layers of width 128) feeds a 4-layer
Llama text model (width 128, 4 heads, FFN 384) through Idefics3's pixel-shuffle connector
(2x2 patches -> one token, so 9 image tokens). The tokenizer is word-level, trained by our own
code on every word the synthetic world, the task prompts and the chat template use; it
lowercases, splits words from punctuation, and its decoder puts punctuation back against the
word before it. The chat template is ours (`chat_template`): LLaVA-1.5's layout
(`USER: <image>\\n{prompt} ASSISTANT: {answer}</s>`, "image-first") or the question before the
image (`USER: {prompt}\\n<image> ASSISTANT: {answer}</s>`, "question-first", what `toy-train`
uses: see toy/train.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                          Idefics3Processor, Idefics3VisionConfig, LlamaConfig, PreTrainedTokenizerFast)

from .. import tasks

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>",
                  "<end_of_utterance>"]
_USER_PARTS = {
    # the parts of the user turn in their order: image first (LLaVA-1.5's layout) ...
    "image-first": ("{% for part in message['content'] %}"
                    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
                    "{% endfor %}"),
    # ... or the text first and the image after it, wherever the message put them
    "question-first": ("{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
                       "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '\\n<image>' }}{% endif %}{% endfor %}"),
}


def chat_template(layout: str) -> str:
    """The toy's chat template: `USER: <image>\\n{prompt} ASSISTANT: {answer}</s>` ("image-first")
    or `USER: {prompt}\\n<image> ASSISTANT: {answer}</s>` ("question-first")."""
    if layout not in _USER_PARTS:
        raise ValueError(f"unknown template layout {layout!r}; choose one of {', '.join(_USER_PARTS)}")
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        + _USER_PARTS[layout] + "{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ '</s>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


TEMPLATES: tuple[str, ...] = tuple(_USER_PARTS)
CHAT_TEMPLATE = chat_template("image-first")
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class ToyConfig:
    image_size: int = 96
    patch_size: int = 16
    scale_factor: int = 2       # pixel shuffle: 2x2 patches -> one image token
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 256


def prompt_words() -> set[str]:
    """Words of the four task prompts and the chat template (placeholders left out)."""
    texts = [tasks.vqa_prompt(""), tasks.ocr_prompt(), tasks.caption_prompt(), tasks.retrieval_prompt(""),
             "USER: ASSISTANT: Yes No"]
    return {w for text in texts for w in _WORD.findall(text.lower())}


def build_tokenizer(words: set[str] | list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (lowercased), with LLaVA's special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words} | prompt_words() | set(".,?:!'")):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)   # never split, never lowercased
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece joins with spaces and its cleanup glues " ." " ," " ?" " !" to the word before;
    # it leaves " :" alone, so a Replace (applied per decoded piece) glues the colon too.
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_toy_vlm(words: set[str] | list[str], out: str | Path | None = None, *, config: ToyConfig = ToyConfig(),
                  seed: int = 0, template: str = "image-first") -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """A freshly initialised toy VLM and its processor (saved to `out` when given)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    vision = Idefics3VisionConfig(hidden_size=config.vision_hidden, intermediate_size=2 * config.vision_hidden,
                                  num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                                  image_size=config.image_size, patch_size=config.patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.text_hidden,
                       num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                       num_key_value_heads=config.text_heads, intermediate_size=config.intermediate_size,
                       max_position_embeddings=config.max_positions, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=config.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Idefics3ImageProcessor(size={"longest_edge": config.image_size},
                                             max_image_size={"longest_edge": config.image_size},
                                             do_image_splitting=False)
    image_tokens = (config.image_size // config.patch_size) ** 2 // config.scale_factor ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_tokens,
                                  chat_template=chat_template(template))
    if out is not None:
        save(model, processor, out)
    return model, processor


def save(model, processor, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)   # safetensors
    processor.save_pretrained(out)
    return out
