"""Staged training of the toy VLM on examples drawn afresh from the synthetic world.

A recipe is a sequence of `Stage`s, each run with its own AdamW optimiser and a warm-up +
cosine learning-rate schedule:

- `kind="vision"`: dense pre-training of the vision tower and the connector. Linear read-out
  heads on each of the 9 image tokens predict that cell's colour, shape and size (or "no shape"),
  the word whose box starts in that cell (or none), and the cell's index. The heads are dropped
  afterwards: the saved model stays a plain `Idefics3ForConditionalGeneration`.
- `kind="instruct"`: teacher-forced answers (the answer tokens and the end-of-turn token, exactly
  what `VLM.encode(..., with_stop=True)` labels) on a `stream.Mix` of tasks, question types and
  scene sizes, with a learning-rate multiplier per module group (`vision`, `connector`, `text`;
  0 freezes the group).

Every batch is a deterministic function of `(seed, stage, step)` (see `stream`), the model and
the read-out heads are seeded, and nothing in the models draws random numbers while training
(no dropout), so a run is a function of its recipe. A checkpoint (weights, optimiser state and
progress, one safetensors file written atomically) is written every `checkpoint_minutes` and at
the end of each stage; a killed run started again with the same arguments continues from it and
ends with the same weights as an uninterrupted run. `training.json` records every stage.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from ..errors import ProgressMismatchError, UsageError
from ..files import atomic_write, digest, write_json
from ..models import VLM
from .annotate import vocabulary
from .model import TEMPLATES, ToyConfig, build_toy_vlm, save
from .scenes import COLORS, OCR_WORDS, POSITION_CELLS, SHAPES, SIZES, render
from .stream import Mix, batch as stream_batch

GROUPS: tuple[str, ...] = ("vision", "connector", "text")
CHECKPOINT = ".checkpoint.safetensors"


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe (see the module docstring)."""

    name: str
    kind: str = "instruct"
    steps: int = 1000
    lr: float = 2e-3
    batch_size: int = 32
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    mix: Mix = field(default_factory=Mix)
    lr_scale: tuple[tuple[str, float], ...] = ()   # (group, multiplier); groups not named: 1.0
    # The pointer loss (instruct stages): a linear head on the image tokens' hidden states after
    # `pointer_layer` decoder layers must pick the token the answer is read from (the shape a VQA
    # question asks about, the OCR box; `stream.Sample.target_cell`): cross-entropy over the image
    # tokens, weighted by `pointer_weight`; 0 = off.
    pointer_weight: float = 0.0
    pointer_layer: int = 2

    def __post_init__(self):
        if self.kind not in ("vision", "instruct"):
            raise ValueError(f"stage {self.name!r}: kind must be 'vision' or 'instruct', not {self.kind!r}")
        unknown = [g for g, _ in self.lr_scale if g not in GROUPS]
        if unknown:
            raise ValueError(f"stage {self.name!r}: unknown module groups {unknown}; use {', '.join(GROUPS)}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 0 and batch_size >= 1")

    def scale(self, group: str) -> float:
        return dict(self.lr_scale).get(group, 1.0)


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    seed: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    template: str = "question-first"
    model: ToyConfig = field(default_factory=ToyConfig)

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be distinct; got {names}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {self.template!r}")

    def only(self, names: list[str] | None) -> "Recipe":
        """The recipe with only the named stages (in recipe order)."""
        if not names:
            return self
        unknown = [n for n in names if n not in {s.name for s in self.stages}]
        if unknown:
            raise UsageError(f"unknown stage(s) {', '.join(unknown)}; this recipe has "
                             f"{', '.join(s.name for s in self.stages)}")
        return replace(self, stages=tuple(s for s in self.stages if s.name in names))

    def scaled(self, factor: float) -> "Recipe":
        """Every stage's steps (and warm-up) times `factor`, at least one step: for quick probes."""
        return replace(self, stages=tuple(replace(s, steps=max(1, round(s.steps * factor)),
                                                  warmup_steps=max(1, round(s.warmup_steps * factor)))
                                          for s in self.stages))


def lookup(max_shapes: int) -> Mix:
    """Answers read from one image token: VQA about one shape (its colour, its shape, where it is)
    and OCR, on scenes of at most `max_shapes` shapes."""
    return Mix(tasks=(("vqa", 0.7), ("ocr", 0.3)), question_types=("position", "color", "shape"),
               max_shapes=max_shapes)


ALL = Mix()
# The shipped recipe; README's "Training it" section gives the measurements behind each choice.
RECIPE = Recipe(stages=(
    Stage("vision", kind="vision", steps=150, lr=2e-3, batch_size=64, warmup_steps=20),
    Stage("lookup1", steps=200, lr=2e-3, mix=lookup(1), pointer_weight=1.0),
    Stage("lookup2", steps=400, lr=2e-3, warmup_steps=20, mix=lookup(2), pointer_weight=1.0),
    Stage("lookup3", steps=1400, lr=2e-3, warmup_steps=20, mix=lookup(3), pointer_weight=1.0),
    Stage("instruct", steps=7000, lr=2e-3, mix=ALL, pointer_weight=1.0,
          lr_scale=(("vision", 0.3), ("connector", 0.3))),
))


def _variant(recipe: Recipe, *, template: str | None = None, pointer: bool = True, curriculum: bool = True) -> Recipe:
    stages = list(recipe.stages)
    if not pointer:
        stages = [replace(s, pointer_weight=0.0) for s in stages]
    if not curriculum:
        lookups = [s for s in stages if s.name.startswith("lookup")]
        merged = replace(lookups[-1], name="lookup3", steps=sum(s.steps for s in lookups), warmup_steps=100)
        stages = [s for s in stages if not s.name.startswith("lookup")]
        stages.insert(1, merged)
    return replace(recipe, stages=tuple(stages), template=template or recipe.template)


# The shipped recipe and the ablations README's table measures (toy-train --recipe NAME).
RECIPES: dict[str, Recipe] = {
    "shipped": RECIPE,
    "no-pointer": _variant(RECIPE, pointer=False),
    "no-curriculum": _variant(RECIPE, curriculum=False),
    "image-first": _variant(RECIPE, template="image-first", pointer=False),
    "no-vision": replace(RECIPE, stages=RECIPE.stages[1:]),
}


# --------------------------------------------------------------------------- token building

@dataclass(frozen=True)
class Example:
    image: int            # row of the batch's pixel table
    task: str
    input_ids: tuple[int, ...]
    n_labels: int         # the last n_labels tokens are the answer + end of turn


class Encoder:
    """Builds the exact token sequences `VLM.encode` builds, without re-running the processor.

    The processor replaces the one image placeholder of the chat prompt by a fixed token
    sequence (for a fixed image size); we find that sequence once, from a real processor call,
    and check one full example against the processor (`check`).
    """

    def __init__(self, vlm: VLM, image):
        self.vlm = vlm
        self.image_id = vlm.tokenizer.convert_tokens_to_ids(vlm.processor.image_token)
        plain = vlm.tokenizer(vlm.chat_prompt("x"))["input_ids"]
        processed = vlm.encode([image], ["x"]).inputs["input_ids"][0].tolist()
        at = plain.index(self.image_id)
        tail = len(plain) - at - 1
        self.expansion = processed[at:len(processed) - tail]
        if processed[:at] != plain[:at] or processed[len(processed) - tail:] != plain[at + 1:]:
            raise RuntimeError("the processor changed more than the image placeholder; toy-train cannot mirror it")
        self._heads: dict[str, list[int]] = {}

    def ids(self, prompt: str, answer: str) -> tuple[tuple[int, ...], int]:
        answer_ids = self.vlm.answer_token_ids(prompt, answer, with_stop=True)
        if prompt not in self._heads:
            if len(self._heads) >= 4096:     # retrieval prompts rarely repeat: keep the cache bounded
                self._heads.clear()
            expanded: list[int] = []
            for t in self.vlm.tokenizer(self.vlm.chat_prompt(prompt))["input_ids"]:
                expanded.extend(self.expansion if t == self.image_id else [t])
            self._heads[prompt] = expanded
        return tuple(self._heads[prompt] + answer_ids), len(answer_ids)

    def check(self, image, prompt: str, answer: str) -> None:
        """Our token building must equal the processor's (the real path) for one example."""
        ids, n = self.ids(prompt, answer)
        encoded = self.vlm.encode([image], [prompt], [answer], with_stop=True)
        if encoded.inputs["input_ids"][0].tolist() != list(ids) or int((encoded.labels != -100).sum()) != n:
            raise RuntimeError("toy-train's token building disagrees with the processor; fix Encoder.ids")


def collate(batch: list[Example], pixels: torch.Tensor, pad_id: int) -> dict:
    """Left-padded ids, attention mask, labels (answer + end of turn only) and one image per row."""
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


def example_mean_loss(model, batch: dict, outputs=None) -> torch.Tensor:
    """Cross-entropy averaged over each example's labelled tokens, then over examples.

    The usual token mean lets a 20-token caption outweigh a 2-token VQA or OCR answer ten to
    one; with it the short-answer tasks (the ones that need the image most) barely train.
    """
    labels = batch["labels"]
    if outputs is None:
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = outputs.logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets.clamp(min=0),
                                               reduction="none")
    per_example = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_example.mean()


# --------------------------------------------------------------------------- the vision stage

READOUTS: dict[str, int] = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1,
                            "word": len(OCR_WORDS) + 1, "cell": 9}


def readout_heads(hidden: int, seed: int) -> torch.nn.ModuleDict:
    torch.manual_seed(seed + 1)
    return torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in READOUTS.items()})


def pointer_head(hidden: int, seed: int) -> torch.nn.ModuleDict:
    torch.manual_seed(seed + 2)
    return torch.nn.ModuleDict({"pointer": torch.nn.Linear(hidden, 1)})


def pointer_loss(outputs, batch: dict, cells: list[int | None], head, layer: int, image_id: int) -> torch.Tensor:
    """Cross-entropy of `head`'s score over each row's image tokens (after `layer` decoder layers)
    against the token of the shape the question asks about; rows without one are left out."""
    rows = [i for i, c in enumerate(cells) if c is not None]
    if not rows:
        return outputs.logits.new_zeros(())
    hidden = outputs.hidden_states[layer][rows]
    is_image = batch["input_ids"][rows] == image_id
    per_row = int(is_image[0].sum())
    scores = head["pointer"](hidden[is_image].view(len(rows), per_row, -1)).squeeze(-1)
    return torch.nn.functional.cross_entropy(scores, torch.tensor([cells[i] for i in rows]))


def readout_labels(scenes) -> dict[str, torch.Tensor]:
    """Per image and cell (row-major over the 3x3 grid): class 0 is "nothing there"."""
    labels = {k: torch.zeros(len(scenes), 9, dtype=torch.long) for k in READOUTS}
    colors, shapes = list(COLORS), list(SHAPES)
    for b, scene in enumerate(scenes):
        labels["cell"][b] = torch.arange(9)
        for obj in scene.objects:
            col, row = POSITION_CELLS[obj.position]
            labels["color"][b, row * 3 + col] = colors.index(obj.color) + 1
            labels["shape"][b, row * 3 + col] = shapes.index(obj.shape) + 1
            labels["size"][b, row * 3 + col] = SIZES.index(obj.size) + 1
        if scene.word is not None:
            x, y, _, _ = scene.word_box
            grid = scene.image_size // 3
            labels["word"][b, (y // grid) * 3 + x // grid] = OCR_WORDS.index(scene.word) + 1
    return labels


def image_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """The connector's output: [images, image tokens, text hidden]."""
    features = model.model.get_image_features(pixels[:, None]).pooler_output
    return torch.stack(list(features))


# --------------------------------------------------------------------------- the loop

def _pixels(processor, scenes) -> torch.Tensor:
    return processor.image_processor([[render(s)] for s in scenes], return_tensors="pt")["pixel_values"][:, 0]


def _group_of(name: str) -> str:
    if name.startswith("model.vision_model."):
        return "vision"
    if name.startswith("model.connector."):
        return "connector"
    return "text"


def _optimizer(model, stage: Stage, recipe: Recipe, heads=None) -> torch.optim.AdamW:
    groups = []
    named = list(model.named_parameters())
    wanted = ("vision", "connector") if stage.kind == "vision" else GROUPS
    for group in GROUPS:
        scale = stage.scale(group) if group in wanted else 0.0
        params = [(n, p) for n, p in named if _group_of(n) == group]
        for _, p in params:
            p.requires_grad_(scale > 0)
        if scale == 0:
            continue
        for decay in (True, False):
            chosen = [p for _, p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": recipe.weight_decay if decay else 0.0,
                               "scale": scale})
    if heads is not None:
        groups.append({"params": list(heads.parameters()), "weight_decay": 0.0, "scale": 1.0})
    return torch.optim.AdamW(groups, lr=stage.lr)


def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _fingerprint(recipe: Recipe, init: str | None) -> str:
    return digest({"recipe": json.loads(json.dumps(asdict(recipe))), "init": init})


def _save_checkpoint(path: Path, model, optimizer, heads, progress: dict) -> None:
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if heads is not None:
        tensors.update({f"heads/{k}": v.detach().contiguous() for k, v in heads.state_dict().items()})
    if optimizer is not None:
        for index, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optim/{index}/{key}"] = value.detach().contiguous()
    atomic_write(path, save_tensors(tensors, metadata={"progress": json.dumps(progress)}))


def _load_checkpoint(path: Path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        progress = json.loads(f.metadata()["progress"])
        return {k: f.get_tensor(k) for k in f.keys()}, progress


def _restore(model, optimizer, heads, tensors: dict) -> None:
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    if heads is not None:
        heads.load_state_dict({k[len("heads/"):]: v for k, v in tensors.items() if k.startswith("heads/")})
    if optimizer is None:
        return
    state = optimizer.state_dict()
    restored: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            restored.setdefault(int(index), {})[name] = value
    state["state"] = restored
    optimizer.load_state_dict(state)


def _evaluate(model, vlm: VLM, on_evaluate, stage: str, step: int) -> None:
    model.eval()
    with torch.no_grad():
        on_evaluate(vlm, stage, step)
    model.train()


def _load_init(init: str | Path):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(init)
    processor = AutoProcessor.from_pretrained(init)
    return model, processor


def train(out: str | Path, recipe: Recipe = RECIPE, *, init: str | Path | None = None, threads: int = 2,
          checkpoint_minutes: float = 3.0, progress: bool = True, stop_after: int | None = None,
          evaluate_every: int | None = None, on_evaluate: Callable[[VLM, str, int], None] | None = None) -> dict:
    """Run `recipe` and save the model in `out`; return the summary written to `training.json`.

    Args:
        init: start from this saved toy VLM (a folder) instead of a fresh, seeded model; its chat
            template and sizes are kept (the recipe's `template` and `model` are then unused).
        checkpoint_minutes: how often the checkpoint `out/.checkpoint.safetensors` is written.
        stop_after: stop (as if killed) after this many optimiser steps of this call, with a
            checkpoint written; tests use it. A later call with the same arguments continues.
        evaluate_every, on_evaluate: call `on_evaluate(vlm, stage name, step)` (the model in eval
            mode) every `evaluate_every` steps of a stage and at its end; it must not train.

    Raises:
        ProgressMismatchError: `out` holds the checkpoint of a run with another recipe or init.
    """
    out = Path(out)
    torch.set_num_threads(threads)
    checkpoint = out / CHECKPOINT
    fingerprint = _fingerprint(recipe, None if init is None else str(init))
    if init is None:
        model, processor = build_toy_vlm(set(vocabulary()), config=recipe.model, seed=recipe.seed,
                                         template=recipe.template)
    else:
        model, processor = _load_init(init)
    vlm = VLM(model, processor, name="toy-vlm")
    resumed = None
    if checkpoint.exists():
        tensors, resumed = _load_checkpoint(checkpoint)
        if resumed["fingerprint"] != fingerprint:
            raise ProgressMismatchError(
                f"{out} holds the checkpoint of a toy-train run with another recipe or --init; use another --out "
                f"or delete {checkpoint} to start over", path=checkpoint)
    stage_logs: list[dict] = resumed["stages"] if resumed else []
    first_scene = stream_batch(recipe.seed, "encoder-check", 0, Mix(tasks=(("caption", 1.0),)), 1)[0]
    encoder = Encoder(vlm, render(first_scene.scene))
    encoder.check(render(first_scene.scene), first_scene.prompt, first_scene.answer)
    hidden = model.config.text_config.hidden_size
    started, done_this_call = time.time(), 0
    elapsed_before = resumed["seconds"] if resumed else 0.0
    for index, stage in enumerate(recipe.stages):
        if resumed and index < resumed["stage"]:
            continue
        heads = (readout_heads(hidden, recipe.seed) if stage.kind == "vision"
                 else pointer_head(hidden, recipe.seed) if stage.pointer_weight > 0 else None)
        optimizer = _optimizer(model, stage, recipe, heads)
        start_step, losses = 0, []
        if resumed and index == resumed["stage"]:
            # a checkpoint at step 0 was taken between stages: weights only, a fresh optimiser
            _restore(model, optimizer if resumed["step"] else None, heads if resumed["step"] else None, tensors)
            start_step, losses = resumed["step"], resumed["losses"]
            resumed = None
        model.train()
        stage_started = time.time()
        last_save = time.time()
        bar = tqdm(total=stage.steps, initial=start_step, desc=f"toy-train {stage.name}", disable=not progress)
        accuracy: dict[str, float] = {}

        def progress_state(step):
            return {"fingerprint": fingerprint, "stage": index, "step": step, "losses": losses,
                    "stages": stage_logs, "seconds": elapsed_before + time.time() - started}

        for step in range(start_step, stage.steps):
            samples = stream_batch(recipe.seed, stage.name, step, stage.mix, stage.batch_size)
            pixels = _pixels(processor, [s.scene for s in samples])
            factor = lr_at(step, stage)
            for group in optimizer.param_groups:
                group["lr"] = factor * group["scale"]
            if stage.kind == "vision":
                labels = readout_labels([s.scene for s in samples])
                tokens = image_tokens(model, pixels)
                logits = {k: heads[k](tokens) for k in READOUTS}
                loss = sum(torch.nn.functional.cross_entropy(logits[k].flatten(0, 1), labels[k].flatten())
                           for k in READOUTS)
                accuracy = {k: round((logits[k].argmax(-1) == labels[k]).float().mean().item(), 4) for k in READOUTS}
            else:
                examples = [Example(i, s.task, *encoder.ids(s.prompt, s.answer)) for i, s in enumerate(samples)]
                inputs = collate(examples, pixels, vlm.tokenizer.pad_token_id)
                if stage.pointer_weight > 0:
                    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
                    loss = example_mean_loss(model, inputs, outputs) + stage.pointer_weight * pointer_loss(
                        outputs, inputs, [s.target_cell for s in samples], heads, stage.pointer_layer, encoder.image_id)
                else:
                    loss = example_mean_loss(model, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], recipe.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            done_this_call += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if stop_after is not None and done_this_call >= stop_after and step + 1 < stage.steps:
                _save_checkpoint(checkpoint, model, optimizer, heads, progress_state(step + 1))
                bar.close()
                return {"stopped": True, "stage": stage.name, "step": step + 1}
            if on_evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0 \
                    and step + 1 < stage.steps:
                _evaluate(model, vlm, on_evaluate, stage.name, step + 1)
            if time.time() - last_save >= 60 * checkpoint_minutes:
                _save_checkpoint(checkpoint, model, optimizer, heads, progress_state(step + 1))
                last_save = time.time()
        bar.close()
        if on_evaluate is not None:
            _evaluate(model, vlm, on_evaluate, stage.name, stage.steps)
        log = {"name": stage.name, "kind": stage.kind, "steps": stage.steps,
               "seconds": round(time.time() - stage_started, 1), "config": json.loads(json.dumps(asdict(stage))),
               "first_loss": losses[0] if losses else None,
               "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
               "loss_curve": losses[::10]}
        if stage.kind == "vision":
            log["readout_accuracy"] = accuracy   # of the last batch, fresh scenes
        stage_logs.append(log)
        for p in model.parameters():
            p.requires_grad_(True)
        if index + 1 < len(recipe.stages):
            # the next stage starts from these weights with a fresh optimiser
            _save_checkpoint(checkpoint, model, None, None,
                             {"fingerprint": fingerprint, "stage": index + 1, "step": 0, "losses": [],
                              "stages": stage_logs, "seconds": elapsed_before + time.time() - started})
            if stop_after is not None and done_this_call >= stop_after:
                return {"stopped": True, "stage": recipe.stages[index + 1].name, "step": 0}
    model.eval()
    save(model, processor, out)
    summary = {"seconds": round(elapsed_before + time.time() - started, 1), "seed": recipe.seed,
               "template": recipe.template if init is None else f"from {init}", "init": None if init is None else str(init),
               "model_config": asdict(recipe.model) if init is None else None,
               "weight_decay": recipe.weight_decay, "grad_clip": recipe.grad_clip, "threads": threads,
               "parameters": sum(p.numel() for p in model.parameters()), "stages": stage_logs}
    write_json(out / "training.json", summary)
    checkpoint.unlink(missing_ok=True)
    return summary


__all__ = ["GROUPS", "CHECKPOINT", "Stage", "Recipe", "lookup", "ALL", "RECIPE", "RECIPES", "Example", "Encoder", "collate",
           "example_mean_loss", "READOUTS", "readout_heads", "readout_labels", "pointer_head", "pointer_loss", "image_tokens", "lr_at", "train"]
