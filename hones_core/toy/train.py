"""Teacher-forced multi-task training of the toy VLM on the synthetic world.

Every training image gives up to six examples per epoch: `vqa_per_image` VQA questions
(drawn afresh each epoch from the scene the world generator recorded, so the model sees
every question type about every image over the epochs, not the one question stored in the
split), its OCR word (when it has one), its canonical caption (the first reference; for a
seeded fraction of the images each epoch, since captions are long and learned first), and one retrieval
question, with even odds either a caption of its own ("Yes") or a hard negative mined by
word overlap from other images ("No"). The loss is cross-entropy on the answer tokens and
the end-of-turn token, exactly the tokens `VLM.encode(..., with_stop=True)` labels.

Images are run through the processor once and token ids are built once per example, so
an epoch costs only forward and backward passes. Seeded: the same data and arguments give
the same weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data, tasks
from ..models import VLM, load_image
from .annotate import make_vqa, scene_from_record, vocabulary
from .model import ToyConfig, build_toy_vlm, save
from .scenes import Scene


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    n_negatives: int = 9
    caption_fraction: float = 0.5   # captions are the longest, and learned first: caption half the images
    ocr_repeats: int = 1            # show each OCR example this many times an epoch
    vqa_per_image: int = 2          # fresh questions per image and epoch (when the split records scenes)
    # Stage 1: the first `focus_steps` steps train on these tasks only. Reading a word makes the
    # text model look at the image and the vision tower learn local patterns within ~200 steps;
    # mixed from the start, the model sits on the answer priors for well over 1000 steps.
    focus_tasks: tuple[str, ...] = ("ocr",)
    focus_steps: int = 500
    # "token": mean cross-entropy over all labelled tokens of the batch (captions weigh most);
    # "example": each example's token mean, then the mean over examples (see example_mean_loss).
    loss: str = "example"
    threads: int = 2


@dataclass(frozen=True)
class Example:
    image: int            # index into the pixel table
    task: str
    input_ids: tuple[int, ...]
    n_labels: int         # the last n_labels tokens are the answer + end of turn


class Encoder:
    """Builds the exact token sequences `VLM.encode` builds, without re-running the processor.

    The processor replaces the one image placeholder of the chat prompt by a fixed token
    sequence (for a fixed image size); we find that sequence once, from a real processor call.
    """

    def __init__(self, vlm: VLM, image):
        self.vlm = vlm
        self.image_id = vlm.tokenizer.convert_tokens_to_ids(vlm.processor.image_token)
        chat = vlm.chat_prompt("x")
        plain = vlm.tokenizer(chat)["input_ids"]
        processed = vlm.encode([image], ["x"]).inputs["input_ids"][0].tolist()
        at = plain.index(self.image_id)
        tail = len(plain) - at - 1
        self.expansion = processed[at:len(processed) - tail]
        if processed[:at] != plain[:at] or processed[len(processed) - tail:] != plain[at + 1:]:
            raise RuntimeError("the processor changed more than the image placeholder; toy-train cannot mirror it")

    def ids(self, prompt: str, answer: str) -> tuple[tuple[int, ...], int]:
        answer_ids = self.vlm.answer_token_ids(prompt, answer, with_stop=True)
        head = self.vlm.tokenizer(self.vlm.chat_prompt(prompt))["input_ids"]
        expanded: list[int] = []
        for t in head:
            expanded.extend(self.expansion if t == self.image_id else [t])
        return tuple(expanded + answer_ids), len(answer_ids)


def _examples(records: list[data.Record], encoder: Encoder, image_index: dict, *, seed: int,
              n_negatives: int, caption_fraction: float = 1.0, ocr_repeats: int = 1,
              scenes: list[Scene] | None = None, vqa_per_image: int = 1) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []

    def add(record, task, prompt, answer):
        ids, n = encoder.ids(prompt, answer)
        out.append(Example(image_index[record.index], task, ids, n))

    for record in records:
        if scenes is not None:
            for _ in range(vqa_per_image):
                vqa = make_vqa(scenes[record.index], rng, question_id=0)
                add(record, "vqa", tasks.vqa_prompt(vqa["question"]), vqa["answer"])
        elif record.question:
            add(record, "vqa", tasks.vqa_prompt(record.question), record.answer)
        if record.ocr_text:
            for _ in range(ocr_repeats):
                add(record, "ocr", tasks.ocr_prompt(), record.ocr_text)
        if record.captions and rng.random() < caption_fraction:
            add(record, "caption", tasks.caption_prompt(), record.captions[0])
    by_index = {r.index: r for r in records}
    for item in data.build_retrieval_items([r for r in records if r.captions], n_negatives=n_negatives, seed=seed):
        record = by_index[item.record_index]
        if rng.random() < 0.5:
            add(record, "retrieval", tasks.retrieval_prompt(item.candidates[item.positive]), "Yes")
        else:
            negatives = [c for i, c in enumerate(item.candidates) if i != item.positive]
            add(record, "retrieval", tasks.retrieval_prompt(rng.choice(negatives)), "No")
    rng.shuffle(out)
    return out


def _scenes(data_file: Path) -> list[Scene] | None:
    """The scenes a toy-world split recorded, one per record; None for other data (VQA then
    uses each record's own question)."""
    if data_file.suffix != ".json":
        return None
    raw = json.loads(data_file.read_text())["data"]
    return [scene_from_record(r) for r in raw] if all("scene" in r for r in raw) else None


def _collate(batch: list[Example], pixels: torch.Tensor, pad_id: int) -> dict:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, width - n:] = torch.tensor(e.input_ids)
        mask[row, width - n:] = 1
        labels[row, width - e.n_labels:] = ids[row, width - e.n_labels:]
    # one image (one tile: no splitting) per row: [batch, 1, channels, height, width]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels[[e.image for e in batch]][:, None],
            "labels": labels}


def example_mean_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy averaged over each example's labelled tokens, then over examples.

    The usual token mean lets a 20-token caption outweigh a 2-token VQA or OCR answer ten to
    one; with it the short-answer tasks (the ones that need the image most) barely train.
    """
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets.clamp(min=0),
                                               reduction="none")
    per_example = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_example.mean()


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(data_file: str | Path, out: str | Path, *, images_dir: str | Path | None = None,
          cfg: TrainConfig = TrainConfig(), model_config: ToyConfig = ToyConfig(),
          max_steps: int | None = None, progress: bool = True) -> dict:
    """Train a fresh toy VLM on the records of `data_file`; save it in `out`; return a summary.

    Args:
        max_steps: stop early after this many optimizer steps (tests use a handful).
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    records = data.read_records(data_file, images_dir)
    scenes = _scenes(Path(data_file))
    words = set(vocabulary())
    model, processor = build_toy_vlm(words, config=model_config, seed=cfg.seed)
    vlm = VLM(model, processor, name="toy-vlm")
    encoder = Encoder(vlm, load_image(records[0].image_path))
    _check_encoder(vlm, encoder, records[0])

    image_index = {r.index: i for i, r in enumerate(records)}
    pixels = torch.cat([
        processor.image_processor([[load_image(r.image_path)] for r in records[i:i + 256]],
                                  return_tensors="pt")["pixel_values"][:, 0]
        for i in range(0, len(records), 256)])

    def epoch_examples(epoch: int) -> list[Example]:
        return _examples(records, encoder, image_index, seed=cfg.seed + epoch, n_negatives=cfg.n_negatives,
                         caption_fraction=cfg.caption_fraction, ocr_repeats=cfg.ocr_repeats, scenes=scenes,
                         vqa_per_image=cfg.vqa_per_image)

    first_epoch = epoch_examples(0)
    focus = [e for e in first_epoch if e.task in cfg.focus_tasks]
    focus_steps = cfg.focus_steps if focus else 0

    def batches():
        rng = random.Random(cfg.seed)
        for step in range(focus_steps):
            yield "focus", rng.sample(focus, min(cfg.batch_size, len(focus)))
        for epoch in range(cfg.epochs):
            examples = first_epoch if epoch == 0 else epoch_examples(epoch)
            for start in range(0, len(examples), cfg.batch_size):
                yield epoch, examples[start:start + cfg.batch_size]

    steps_per_epoch = math.ceil(len(first_epoch) / cfg.batch_size)
    total = focus_steps + steps_per_epoch * cfg.epochs
    total = total if max_steps is None else min(max_steps, total)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    model.train()
    losses: list[float] = []
    started = time.time()
    step = 0
    bar = tqdm(total=total, desc="toy-train", disable=not progress)
    for epoch, chunk in batches():
        if step >= total:
            break
        batch = _collate(chunk, pixels, vlm.tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, cfg)
        loss = example_mean_loss(model, batch) if cfg.loss == "example" else model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    save(model, processor, out)
    summary = {"steps": step, "examples_per_epoch": len(first_epoch), "images": len(records),
               "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
               "seconds": round(time.time() - started, 1), "train_config": asdict(cfg),
               "model_config": asdict(model_config),
               "parameters": sum(p.numel() for p in model.parameters())}
    Path(out, "training.json").write_text(json.dumps({**summary, "loss_curve": losses[::10]}, indent=1))
    return summary


def _check_encoder(vlm: VLM, encoder: Encoder, record: data.Record) -> None:
    """Our fast token building must equal the processor's (the real path) for one example."""
    prompt = tasks.caption_prompt()
    answer = record.captions[0] if record.captions else "yes"
    ids, n = encoder.ids(prompt, answer)
    encoded = vlm.encode([load_image(record.image_path)], [prompt], [answer], with_stop=True)
    if encoded.inputs["input_ids"][0].tolist() != list(ids) or int((encoded.labels != -100).sum()) != n:
        raise RuntimeError("toy-train's token building disagrees with the processor; fix Encoder.ids")
