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

Batches of several rows run inside `sharing.share_rows` (`VLM.sharing`): rows with the same
image run the vision tower once, and rows with the same input whose plans agree up to a
layer run the decoder layers before it once (see `hones_core.sharing`). Repeated (image,
text) rows are also processed by the processor only once (`VLM._process`), for families
whose processor outputs are batch-first (`Architecture.batch_first_inputs`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .arch import Architecture
from .errors import ModelLoadError, TemplateError, UnsupportedModelError
from .interventions import Plan, intervene
from .sharing import LayerTrace, run_from_layer, share_rows, trace_layers

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
             max_memory: dict | None = None, compat: str = "ours") -> VLM:
    """Load a supported VLM and its processor.

    Args:
        name_or_path: a Hub model id ("llava-hf/llava-1.5-7b-hf") or a local directory.
        revision: a branch, tag or commit of the Hub repo (ignored for local directories).
        device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available.
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or an explicit dtype.
        trust_remote_code: run code from the model repo; off unless you ask for it.
        device_map, max_memory: "auto" splits the model over the GPUs that `max_memory` lists
            (all visible ones when it is None), through transformers/accelerate; `device` must be None.
        compat: "ours" (default) or "official": the official release's input choices (`VLM`).

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
    return VLM(model, processor, name=source, revision=revision, compat=compat)


COMPAT = ("ours", "official")
OFFICIAL_FAMILIES = ("llava", "qwen2.5-vl")      # the two the official release runs


def check_compat(compat: str, family: str, name: str = "") -> str:
    """`compat`, if this family has it.

    Raises:
        ValueError: an unknown mode, or the official mode for a family the official release never ran.
    """
    if compat not in COMPAT:
        raise ValueError(f"compat must be one of {', '.join(COMPAT)}, not {compat!r}")
    if compat == "official" and family not in OFFICIAL_FAMILIES:
        raise ValueError(f"--compat official reproduces the official release, which runs only "
                         f"{' and '.join(OFFICIAL_FAMILIES)}; {name or 'this model'} is {family!r} — use the "
                         f"default (ours)")
    return compat


class VLM:
    """A loaded model + processor with the operations HONES needs.

    Attributes:
        model: the transformers model (eval mode).
        processor: its processor (tokenizer padding on the left).
        arch: where layers, heads and neurons are (`arch.Architecture`).
        name, revision: where it came from.
        compat: "ours", or "official": the official release's input choices, to reproduce its
            numbers. Its LLaVA prompt is hand-written (`USER: <image>\n{prompt}\nASSISTANT:`, not the
            processor's chat template; for Qwen2.5-VL it used the chat template, as we do), and its
            DVP targets are the text encoded bare (`tokenizer.encode(text, add_special_tokens=False)`,
            special tokens dropped, at most 128), not the tokens the model would emit after the
            assistant prefix (`target_token_ids`). Only those two families have an official mode.
    """

    def __init__(self, model, processor, *, name: str = "", revision: str | None = None, compat: str = "ours"):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.arch = Architecture(model)
        self.name, self.revision = name, revision
        self._chat_prompts = functools.lru_cache(maxsize=4096)(self._render_chat_prompt)
        self._answer_ids = functools.lru_cache(maxsize=4096)(self._tokenize_answer)
        self._yes_no: tuple[int, int] | None = None
        if getattr(processor, "chat_template", None) is None:
            raise TemplateError(f"{name}: the processor has no chat template; HONES prompts need one")
        # read off the model's own template, also in the official mode: it says how answers follow
        self.answer_separator, self.stop_token_id = self._read_template()
        self.compat = check_compat(compat, self.arch.family.name, name)
        self._chat_prompts.cache_clear()

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
        if getattr(self, "compat", "ours") == "official" and self.arch.family.name == "llava":
            return f"USER: {self.processor.image_token}\n{prompt}\nASSISTANT:"     # the official release's
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
        (one row per prompt, `Architecture.batch_first_inputs`); the result is what processing
        every row gives, since padding depends only on the longest row. Qwen2-VL / Qwen2.5-VL
        (patches of all images concatenated) process every row.
        """
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts; give one image per prompt")
        if not texts:
            raise ValueError("empty batch: give at least one (image, prompt) pair")
        first: dict = {}
        inverse = [first.setdefault((_image_key(img), text), len(first)) for img, text in zip(images, texts)]
        if len(first) == len(texts) or not self.arch.batch_first_inputs:
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

    def target_token_ids(self, prompt: str, text: str) -> list[int]:
        """The token ids of `text` as a DVP target (u_y): what the model would emit for it after the
        prompt, or in the official mode the text encoded bare, special tokens dropped, at most 128."""
        if self.compat == "official":
            special = set(self.tokenizer.all_special_ids)
            return [i for i in self.tokenizer.encode(text, add_special_tokens=False) if i not in special][:128]
        return self.answer_token_ids(prompt, text)

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
        """`sharing.share_rows` for a batch of `rows` rows; a single row has nothing to share (no hooks)."""
        return share_rows(self.arch) if rows > 1 else nullcontext()

    @torch.inference_mode()
    def generate(self, images: Sequence[ImageLike], prompts: Sequence[str], *, max_new_tokens: int = 24,
                 plans: Plans = None) -> list[str]:
        """Greedy answers, one per (image, prompt), special tokens removed and stripped."""
        inputs = self.encode(images, prompts).inputs
        with self._context(self.arch, plans):
            answers = self.generate_from(inputs, max_new_tokens=max_new_tokens)
        return [t.strip() for t in answers]

    @torch.inference_mode()
    def generate_from(self, inputs: dict, *, max_new_tokens: int = 24) -> list[str]:
        """Greedy answers from processor outputs already on the device (`input_ids` `[batch, seq]`, ...).

        Runs under whatever `intervene(...)` block the caller has open (a capture records the
        prompt pass), sharing work between the rows (`sharing`). Returns one text per row with
        special tokens removed, otherwise raw: not stripped or cleaned.
        """
        with self.sharing(inputs["input_ids"].shape[0]):
            out = self.model.generate(**inputs, **self.generation_kwargs(max_new_tokens))
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

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
        """Token ids of "Yes" and "No" as first answer tokens; they must differ (computed once)."""
        if self._yes_no is None:
            yes, no = self.first_token_id("Yes"), self.first_token_id("No")
            if yes == no:
                raise TemplateError(f"{self.name}: 'Yes' and 'No' start with the same token ({yes}); retrieval "
                                    "scores logit(Yes) - logit(No) and cannot work with this tokenizer")
            self._yes_no = (yes, no)     # threads racing here compute the same pair
        return self._yes_no

    def yes_no_margins(self, logits: torch.Tensor) -> torch.Tensor:
        """Retrieval scores: first-token logits `[batch, vocab]` -> logit(Yes) - logit(No), `[batch]`."""
        yes, no = self.yes_no_ids()
        return logits[:, yes] - logits[:, no]

    # ----- generation as token ids, and passes that start at a decoder layer --------------------------
    @property
    def stop_ids(self) -> frozenset[int]:
        """The token ids greedy generation stops at (end of turn and EOS)."""
        return frozenset({self.stop_token_id, self.tokenizer.eos_token_id} - {None})

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """The text `generate` returns for these generated token ids (special tokens removed, stripped)."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    @torch.inference_mode()
    def greedy(self, inputs: dict, *, max_new_tokens: int = 24, plans: Plans = None) -> list[Greedy]:
        """Greedy generation from processor outputs, as token ids with the top-2 logit gap of every step.

        The same computation as `generate_from` (one `model.generate` call, rows shared), returning
        each row's new tokens up to and including its stop token, and per step the gap between the
        two best logits (how far the step was from a tie).

        Raises:
            UnsupportedModelError: the model's generation config changes the logits before the
                argmax (repetition penalty, suppressed tokens, ...): greedy is then not the argmax of the
                logits, and nothing that checks answers against logits can be exact.
        """
        with self._context(self.arch, plans), self.sharing(inputs["input_ids"].shape[0]):
            out = self.model.generate(**inputs, **self.generation_kwargs(max_new_tokens), return_dict_in_generate=True,
                                      output_logits=True, output_scores=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        logits = torch.stack(out.logits, 1).float()           # [rows, steps, vocab]
        scores = torch.stack(out.scores, 1).float()
        if not torch.equal(torch.nan_to_num(logits), torch.nan_to_num(scores)):
            raise UnsupportedModelError(f"{self.name}: its generation config changes the logits before the greedy "
                                        "argmax (a logits processor is active); answers cannot be verified against "
                                        "the logits — run with the reference loop")
        top = logits.topk(2, dim=-1).values
        gaps = top[..., 0] - top[..., 1]
        stops = self.stop_ids
        rows = []
        for r in range(new.shape[0]):
            tokens = []
            for t in new[r].tolist():
                tokens.append(t)
                if t in stops:
                    break
            rows.append(Greedy(tokens, gaps[r, :len(tokens)].tolist(), top[r, :len(tokens), 0].tolist()))
        return rows

    def extend_inputs(self, inputs: dict, extra: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> dict:
        """Processor outputs with token ids appended to each row's text, left-padded again.

        Args:
            inputs: processor outputs (`input_ids` `[batch, seq]`, left-padded, ...).
            extra: per output row, the token ids to append (e.g. the answer generated so far).
            rows: per output row, the input row it extends (default: row i for output row i).
                Only for families with batch-first inputs (`Architecture.batch_first_inputs`).

        Returns:
            The same keys: `input_ids`, `attention_mask` (and `mm_token_type_ids`/`token_type_ids`,
            0 for text) extended; pixels and other per-image tensors as they were (taken per row).

        Raises:
            UnsupportedModelError: another tensor is aligned with the tokens (its meaning for the new
                tokens is unknown), or `rows` repeats rows of a family whose inputs are not batch-first.
        """
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch, seq = ids.shape
        rows = list(range(batch)) if rows is None else list(rows)
        if len(rows) != len(extra):
            raise ValueError(f"{len(extra)} token lists for {len(rows)} rows")
        if rows != list(range(batch)) and not self.arch.batch_first_inputs:
            raise UnsupportedModelError(f"{self.name}: processor outputs are not batch-first; extend every row once, "
                                        "in order")
        token_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
        for key, value in inputs.items():
            aligned = torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, seq)
            if key not in token_keys and aligned:
                raise UnsupportedModelError(f"{self.name}: the processor output {key!r} is aligned with the tokens; "
                                            "cannot tell its value for appended tokens")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [int(mask[r].sum()) + len(e) for r, e in zip(rows, extra)]
        width = max(lengths)
        out = {}
        for key in token_keys:
            if key not in inputs:
                continue
            value = inputs[key]
            fill = {"input_ids": pad}.get(key, 0)
            new = torch.full((len(rows), width), fill, dtype=value.dtype, device=value.device)
            for i, (r, e) in enumerate(zip(rows, extra)):
                real = value[r][mask[r].bool()]
                appended = torch.tensor(list(e), dtype=value.dtype, device=value.device) if key == "input_ids" else \
                    torch.full((len(e),), 1 if key == "attention_mask" else 0, dtype=value.dtype, device=value.device)
                row = torch.cat([real, appended])
                new[i, width - row.shape[0]:] = row
            out[key] = new
        index = torch.tensor(rows, device=ids.device)
        for key, value in inputs.items():
            if key in out:
                continue
            if self.arch.batch_first_inputs and torch.is_tensor(value) and value.dim() and value.shape[0] == batch:
                value = value.index_select(0, index.to(value.device))
            out[key] = value
        return out

    @torch.inference_mode()
    def trace(self, inputs: dict, *, keep: Sequence[int] | None = None) -> tuple[LayerTrace, torch.Tensor]:
        """One base pass (no plan, no KV cache) keeping the decoder layers' inputs (`keep`: only those layers').

        Returns:
            The `sharing.LayerTrace` (start later passes at any layer with `logits_from_layer`) and
            the final hidden states `[batch, seq, hidden]` of the pass.
        """
        with trace_layers(self.arch, keep) as trace:
            hidden = self.last_hidden(inputs, use_cache=False)
        return trace, hidden

    @torch.inference_mode()
    def logits_from_layer(self, trace: LayerTrace, layer: int, rows: Sequence[int], *, plans: Plans = None,
                          last: int = 1) -> torch.Tensor:
        """Logits at the last `last` positions, `[R, last, vocab]` float32, of a pass that starts at `layer`.

        Row r continues trace row `rows[r]` under `plans[r]` (or one plan for all); the plans must not
        act before `layer` (layers < layer are the traced base pass). Equal to a full pass of the same
        rows up to float rounding (other batch shapes).
        """
        index = torch.tensor(list(rows), dtype=torch.long)
        with self._context(self.arch, plans):
            hidden = run_from_layer(self.arch, trace, layer, index)
        return self.unembed(hidden[:, -last:, :])


@dataclass
class Greedy:
    """One row of greedy generation (`VLM.greedy`).

    Attributes:
        tokens: the new token ids, up to and including the stop token (at most max_new_tokens).
        gaps: per step, the difference between the two best logits (how far the step was from a tie).
        best: per step, the best logit (for a relative tie threshold).
    """
    tokens: list[int]
    gaps: list[float]
    best: list[float]


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
