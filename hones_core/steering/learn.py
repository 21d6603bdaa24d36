"""Learned steering: one trained scale per selected FFN neuron, everything else frozen.

z~ = z * (1 + m * s), m the selected-neuron mask, s one fp32 scale per selected neuron (init 0)
and the only tensor that is trained. Loss per dev example = mean CE of the answer tokens +
beta * KL(p_orig || p_scaled) on the answer positions + lambda * mean(s^2). AdamW (no weight
decay), cosine from lr to 0.1 * lr, grad-norm clip, s clamped to [-clamp, clamp] after every
step (`SteerConfig`).

Training data, per epoch (`training_examples`): VQA and OCR items give their gold answer;
a caption item one of its references (`item.targets`, up to 5), drawn anew each epoch; a
retrieval item its positive candidate answered "Yes" plus `train_negatives` (default 4) of its
negative candidates, drawn anew each epoch, answered "No" — the paper's protocol. The unit of
training is the item: an item's loss is the mean over its examples, an optimiser step takes
the mean over `accumulation` items (the last group of an epoch may be smaller and is stepped
too). Examples still run one at a time (batch 1), so memory is that of one sequence.

The teacher p_orig is the same model run without the scaling (no second copy of the weights).
During training every model parameter has `requires_grad=False` (restored afterwards), so
only s gets a gradient. Prompt+answer sequences come from `VLM.encode(..., with_stop=True)`:
the same chat template and image expansion as generation, labels on exactly the answer
tokens and the end-of-turn token (so the model also learns where to stop).

`learn_scales` writes a checkpoint at every epoch boundary when given a file, and continues
from it when rerun with the same items, neurons and settings. Every per-epoch draw (item
order, caption reference, retrieval negatives) depends only on (seed, epoch), so a resumed
run trains on exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..errors import DataFormatError, ProgressMismatchError
from ..files import atomic_write, digest
from ..interventions import Plan, intervene
from ..models import VLM, Encoded
from ..rankings import Scales
from ..tasks import TASKS, TaskItem

__all__ = ["SteerConfig", "Example", "training_examples", "encode_examples", "answer_position_logprobs",
           "neuron_layout", "frozen", "LearnResult", "example_loss", "example_ces", "dev_ce", "accumulate",
           "learn_scales"]


@dataclass(frozen=True)
class SteerConfig:
    """Learned-scaling hyper-parameters (defaults: the official code's)."""
    beta: float = 0.05           # weight of KL(p_orig || p_scaled)
    lam: float = 1e-5            # weight of mean(s^2)
    lr: float = 5e-4
    min_lr_ratio: float = 0.1    # cosine schedule ends at min_lr_ratio * lr
    grad_clip: float = 1.0
    accumulation: int = 4        # items per optimiser step (each example runs alone: batch size 1)
    epochs: int = 2
    clamp: float = 1.5           # s in [-clamp, clamp] after every step
    seed: int = 0                # item order and the per-epoch draws (caption reference, retrieval negatives)
    train_negatives: int = 4     # retrieval: negatives answered "No" per item and epoch (the paper's 4)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.accumulation < 1 or self.train_negatives < 1:
            raise ValueError(f"epochs, accumulation and train_negatives must be at least 1, got {self.epochs}, "
                             f"{self.accumulation} and {self.train_negatives}")
        if self.lr <= 0 or self.beta < 0 or self.lam < 0 or self.clamp <= 0 or self.grad_clip <= 0:
            raise ValueError(f"invalid steering config {self}: lr, clamp and grad_clip must be > 0, "
                             "beta and lam >= 0")


# --------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class Example:
    """One (image, prompt, answer) training sequence; the image comes from `item` (OCR box drawn)."""
    item: TaskItem
    prompt: str
    answer: str


def _item_examples(item: TaskItem, rng: random.Random, negatives: int) -> list[Example]:
    """One item's examples for one epoch (see `training_examples`), drawing from `rng`."""
    if TASKS[item.task].scoring == "yes/no":
        pool = [p for i, p in enumerate(item.candidate_prompts) if i != item.positive]
        if not pool:
            raise DataFormatError(f"retrieval item {item.record_index} has no negative candidate to train 'No' on")
        drawn = rng.sample(pool, min(negatives, len(pool)))
        return [Example(item, item.prompt, item.answer), *(Example(item, p, "No") for p in drawn)]
    if TASKS[item.task].target == "references" and item.targets:
        return [Example(item, item.prompt, rng.choice(item.targets))]
    return [Example(item, item.prompt, item.answer)]


def training_examples(items: Sequence[TaskItem], *, epoch: int = 0, cfg: SteerConfig = SteerConfig()
                      ) -> list[list[Example]]:
    """Each item's teacher-forcing examples in epoch `epoch`: one list per item, in item order.

    - VQA, OCR: the gold answer after the task prompt.
    - Caption: one of `item.targets` (the references), drawn uniformly.
    - Retrieval: the positive candidate answered "Yes", then `cfg.train_negatives` distinct
      negative candidates drawn uniformly without replacement, answered "No" (all of them, in
      a drawn order, when the item has fewer; `learn_scales` warns). Training on "Yes" alone
      would teach the model to say Yes to everything.

    The draws come from an RNG seeded by (cfg.seed, epoch) only: the same for a rerun or a
    resumed run, different from one epoch to the next.

    Raises:
        DataFormatError: a retrieval item has no negative candidate.
    """
    rng = random.Random(f"hones-steer examples {cfg.seed} {epoch}")   # str seeds hash the same in every process
    return [_item_examples(item, rng, cfg.train_negatives) for item in items]


def _warn_short_negatives(items: Sequence[TaskItem], cfg: SteerConfig) -> None:
    """Say when retrieval items have fewer negatives than the protocol trains on (they use all they have)."""
    counts = [len(i.candidates) - 1 for i in items if TASKS[i.task].scoring == "yes/no"]
    short = [c for c in counts if c < cfg.train_negatives]
    if short:
        warnings.warn(f"{len(short)} of {len(counts)} retrieval items have fewer than {cfg.train_negatives} negative "
                      f"candidates (as few as {min(short)}); each trains on all the negatives it has", stacklevel=3)


def encode_examples(vlm: VLM, examples: Sequence[Example]) -> Encoded:
    """Prompt + answer + end-of-turn, labels on exactly the answer and end-of-turn tokens."""
    return vlm.encode([e.item.load_image() for e in examples], [e.prompt for e in examples],
                      [e.answer for e in examples], with_stop=True)


def answer_position_logprobs(vlm: VLM, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-distributions at the answer positions, under the caller's grad mode and plans.

    Returns:
        (`[batch, n, vocab]` float32 log-probabilities predicting each labelled token,
        `[batch, n]` 0/1 mask of the labelled positions), n = the longest answer.
    """
    labels = encoded.labels
    if labels is None:
        raise ValueError("answer_position_logprobs needs a batch encoded with answers")
    n = int((labels != -100).sum(-1).max())
    logits = vlm.unembed(vlm.last_hidden(encoded.inputs)[:, -(n + 1):-1])
    return torch.log_softmax(logits, dim=-1), (labels[:, -n:] != -100).float()


# --------------------------------------------------------------------------- the scale vector


def neuron_layout(selection: Mapping[int, Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, neurons) int64 `[n]` of a selection, sorted by layer then neuron: the order of the scale vector."""
    pairs = sorted((int(layer), int(n)) for layer, neurons in selection.items() for n in neurons)
    if not pairs:
        raise ValueError("the selection is empty: there are no neurons to steer")
    if len(set(pairs)) != len(pairs):
        raise ValueError("the selection lists a neuron twice")
    layers, neurons = zip(*pairs)
    return torch.tensor(layers, dtype=torch.int64), torch.tensor(neurons, dtype=torch.int64)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter `requires_grad=False` inside the block; the flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- learning


@dataclass
class LearnResult:
    """Learned scales and how training went.

    Attributes:
        scales: the trained s per (layer, neuron), with the settings in `meta`.
        history: "dev_ce" (mean answer-token CE on epoch 0's dev examples, averaged per item,
            before training and after every epoch), "train_loss" (per epoch, the mean over
            items of the item loss), "steps" (optimiser steps).
    """
    scales: Scales
    history: dict = field(default_factory=dict)


def example_loss(vlm: VLM, encoded: Encoded, plan: Plan, scale: torch.Tensor, cfg: SteerConfig
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + beta * KL(p_orig || p_scaled) + lam * mean(s^2) of one encoded batch (mean over answer tokens)."""
    if cfg.beta > 0:
        with torch.no_grad():   # the teacher: the same weights, scaling off
            teacher, _ = answer_position_logprobs(vlm, encoded)
    with intervene(vlm.arch, plan):
        student, mask = answer_position_logprobs(vlm, encoded)
    tokens = mask.sum()
    targets = encoded.labels[:, -mask.shape[1]:].clamp(min=0)
    ce = -(student.gather(-1, targets[..., None])[..., 0] * mask).sum() / tokens
    loss = ce + cfg.lam * scale.pow(2).mean()
    kl = torch.zeros(())
    if cfg.beta > 0:
        kl = ((teacher.exp() * (teacher - student)).sum(-1) * mask).sum() / tokens
        loss = loss + cfg.beta * kl
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}


@torch.inference_mode()
def example_ces(vlm: VLM, examples: Sequence[Example], plan: Plan | None, *, batch_size: int = 16) -> list[float]:
    """Each example's mean answer-token cross-entropy under `plan` (None: the unscaled model)."""
    values = []
    for start in range(0, len(examples), batch_size):
        encoded = encode_examples(vlm, examples[start:start + batch_size])
        with intervene(vlm.arch, plan if plan is not None else Plan()):
            logp, mask = answer_position_logprobs(vlm, encoded)
        targets = encoded.labels[:, -mask.shape[1]:].clamp(min=0)
        token_logp = logp.gather(-1, targets[..., None])[..., 0] * mask
        values.extend((-token_logp.sum(-1) / mask.sum(-1)).tolist())
    return values


def dev_ce(vlm: VLM, examples: Sequence[Example], plan: Plan | None, *, batch_size: int = 16) -> float:
    """Mean (over examples) of the mean answer-token cross-entropy under `plan`."""
    values = example_ces(vlm, examples, plan, batch_size=batch_size)
    return sum(values) / len(values)


def _item_mean_ce(vlm: VLM, per_item: Sequence[Sequence[Example]], plan: Plan | None, batch_size: int) -> float:
    """Mean over items of the mean CE over each item's examples (the weighting of the training loss)."""
    values = iter(example_ces(vlm, [e for examples in per_item for e in examples], plan, batch_size=batch_size))
    means = [sum(next(values) for _ in examples) / len(examples) for examples in per_item]
    return sum(means) / len(means)


def accumulate(vlm: VLM, group: Sequence[Sequence[Example]], layers: torch.Tensor, neurons: torch.Tensor,
               scale: torch.Tensor, cfg: SteerConfig, on_example: Callable[[dict], None] | None = None) -> float:
    """Backpropagate one optimiser step's loss into `scale.grad`; returns that loss.

    The step's loss is the mean over the group's items of the mean over each item's examples
    (`group`: one list of examples per item). Each example runs and is backpropagated alone,
    weighted 1 / (items in the group * examples of its item), so the accumulated gradient is
    that of the step's loss while memory stays that of one sequence.
    """
    total = 0.0
    for examples in group:
        for example in examples:
            plan = Plan.learned(layers, neurons, scale)   # fresh views of s after every step
            loss, parts = example_loss(vlm, encode_examples(vlm, [example]), plan, scale, cfg)
            weighted = loss / (len(group) * len(examples))
            weighted.backward()
            total += float(weighted.detach())
            if on_example is not None:
                on_example(parts)
    return total


def _lr(cfg: SteerConfig, step: int, total: int) -> float:
    """Cosine from cfg.lr at step 0 to min_lr_ratio * cfg.lr at the last step."""
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * step / max(1, total - 1)))


def _save_checkpoint(path: Path, key: str, epoch: int, scale: torch.Tensor, optimizer: torch.optim.Optimizer,
                     history: dict) -> None:
    """Scale, AdamW moments and step count after `epoch` epochs, tagged with the run's `key`."""
    state = optimizer.state_dict()["state"].get(0, {})
    tensors = {"scale": scale.detach().clone()}
    for name in ("exp_avg", "exp_avg_sq"):
        if name in state:
            tensors[name] = state[name].detach().clone()
    if "step" in state:
        tensors["step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).clone()
    metadata = {"key": key, "epoch": str(epoch), "history": json.dumps(history)}
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def _load_checkpoint(path: Path, key: str, scale: torch.Tensor, optimizer: torch.optim.Optimizer
                     ) -> tuple[int, dict]:
    """Restore `scale` and `optimizer` from a checkpoint of the run `key`; returns (epochs done, history)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("key") != key:
            raise ProgressMismatchError(
                f"{path} is a checkpoint of a training run with other settings, data or neurons; "
                f"rerun with those, or delete {path} to start this training over", path=path)
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    with torch.no_grad():
        scale.copy_(tensors["scale"])
    if "step" in tensors:
        state = optimizer.state_dict()
        state["state"] = {0: {"step": tensors["step"].reshape(()), "exp_avg": tensors["exp_avg"],
                              "exp_avg_sq": tensors["exp_avg_sq"]}}
        optimizer.load_state_dict(state)
    return int(metadata["epoch"]), json.loads(metadata["history"])


def _train_epoch(vlm: VLM, items: Sequence[TaskItem], epoch: int, layers: torch.Tensor, neurons: torch.Tensor,
                 scale: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: SteerConfig, progress: bool) -> float:
    """One epoch of optimiser steps over `items` in a seeded order; returns the mean item loss."""
    per_item = training_examples(items, epoch=epoch, cfg=cfg)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
    steps = math.ceil(len(items) / cfg.accumulation)
    bar = tqdm(total=sum(len(e) for e in per_item), desc=f"steer {items[0].task} epoch {epoch + 1}/{cfg.epochs}",
               disable=not progress, leave=False)

    def tick(parts: dict) -> None:
        bar.update(1)
        bar.set_postfix(ce=f"{parts['ce']:.3f}", kl=f"{parts['kl']:.2g}")

    loss_sum = 0.0
    for k in range(steps):
        group = [per_item[i] for i in order[k * cfg.accumulation:(k + 1) * cfg.accumulation]]
        loss_sum += len(group) * accumulate(vlm, group, layers, neurons, scale, cfg, tick)
        torch.nn.utils.clip_grad_norm_([scale], cfg.grad_clip)
        for param_group in optimizer.param_groups:
            param_group["lr"] = _lr(cfg, epoch * steps + k, cfg.epochs * steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            scale.clamp_(-cfg.clamp, cfg.clamp)
    bar.close()
    return loss_sum / len(items)


def _run_key(vlm: VLM, items: Sequence[TaskItem], layers: torch.Tensor, neurons: torch.Tensor,
             cfg: SteerConfig) -> str:
    """What a checkpoint must match: settings, neurons, model and everything the draws read from the items."""
    return digest({"cfg": asdict(cfg), "layers": layers.tolist(), "neurons": neurons.tolist(), "model": vlm.name,
                   "items": [(i.record_index, str(i.image_path), i.prompt, i.answer, list(i.targets),
                              list(i.candidates), i.positive) for i in items]})


def learn_scales(vlm: VLM, items: Sequence[TaskItem], selection: Mapping[int, Sequence[int]], *,
                 cfg: SteerConfig = SteerConfig(), checkpoint: str | Path | None = None, batch_size: int = 16,
                 meta: Mapping | None = None, progress: bool = True) -> LearnResult:
    """Train one scale per selected neuron on `items` (the dev split), everything else frozen.

    Args:
        items: dev items of one task (examples per epoch: `training_examples`).
        selection: {layer: [neuron, ...]} to scale.
        cfg: hyper-parameters (`SteerConfig`).
        checkpoint: a file to save training state to at every epoch boundary; if it exists,
            training continues from it (it must come from the same items, neurons and cfg).
        batch_size: for the dev-loss passes (training itself uses batch 1).
        meta: extra JSON-able fields stored in the returned `Scales.meta`.

    Returns:
        `LearnResult` with the scales and the dev-loss history ("dev_ce" is measured on the
        examples of epoch 0, the same before training and after every epoch, averaged per item).

    Raises:
        ProgressMismatchError (alias `SteeringProgressError`): `checkpoint` holds the state of a
            different training run.
        DataFormatError: a retrieval item has no negative candidate.
    """
    if not items:
        raise ValueError("no dev items to learn scales on")
    reference = training_examples(items, epoch=0, cfg=cfg)    # fixed examples, so dev CE is comparable over epochs
    _warn_short_negatives(items, cfg)
    layers, neurons = neuron_layout(selection)
    scale = torch.zeros(len(layers), dtype=torch.float32, requires_grad=True)   # on CPU; hooks move it
    optimizer = torch.optim.AdamW([scale], lr=cfg.lr, weight_decay=0.0)
    key = _run_key(vlm, items, layers, neurons, cfg)
    start_epoch, history = 0, {"dev_ce": [], "train_loss": [], "steps": 0}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        start_epoch, history = _load_checkpoint(path, key, scale, optimizer)
    if not history["dev_ce"]:
        history["dev_ce"].append(_item_mean_ce(vlm, reference, None, batch_size))
    with frozen(vlm.model):
        for epoch in range(start_epoch, cfg.epochs):
            history["train_loss"].append(_train_epoch(vlm, items, epoch, layers, neurons, scale, optimizer, cfg,
                                                      progress))
            history["steps"] += math.ceil(len(items) / cfg.accumulation)
            history["dev_ce"].append(_item_mean_ce(vlm, reference, Plan.learned(layers, neurons, scale.detach()),
                                                   batch_size))
            if path is not None:
                _save_checkpoint(path, key, epoch + 1, scale, optimizer, history)
    info = {**dict(meta or {}), **asdict(cfg), "task": items[0].task, "model": vlm.name,
            "dev_examples": sum(len(e) for e in reference), "dev_ce": history["dev_ce"]}
    return LearnResult(Scales(layers=layers, neurons=neurons, scale=scale.detach().clone(), meta=info), history)
