"""Learned steering: one trained scale per selected FFN neuron, everything else frozen.

z~ = z * (1 + m * s), m the selected-neuron mask, s one fp32 scale per selected neuron (init 0)
and the only tensor that is trained. Loss per dev example = mean CE of the answer tokens +
beta * KL(p_orig || p_scaled) on the answer positions + lambda * mean(s^2). AdamW (no weight
decay), cosine from lr to 0.1 * lr, grad-norm clip, batch 1 with gradient accumulation, s
clamped to [-clamp, clamp] after every step (`SteerConfig`).

The teacher p_orig is the same model run without the scaling (no second copy of the weights).
During training every model parameter has `requires_grad=False` (restored afterwards), so
only s gets a gradient. Prompt+answer sequences come from `VLM.encode(..., with_stop=True)`:
the same chat template and image expansion as generation, labels on exactly the answer
tokens and the end-of-turn token (so the model also learns where to stop).

`learn_scales` writes a checkpoint at every epoch boundary when given a file, and continues
from it when rerun with the same items, neurons and settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..errors import ProgressMismatchError
from ..files import atomic_write, digest
from ..interventions import Plan, intervene
from ..models import VLM, Encoded
from ..rankings import Scales
from ..tasks import TASKS, TaskItem

__all__ = ["SteerConfig", "Example", "training_examples", "encode_examples", "answer_position_logprobs",
           "neuron_layout", "frozen", "LearnResult", "example_loss", "dev_ce", "learn_scales"]


@dataclass(frozen=True)
class SteerConfig:
    """Learned-scaling hyper-parameters (defaults: the official code's)."""
    beta: float = 0.05           # weight of KL(p_orig || p_scaled)
    lam: float = 1e-5            # weight of mean(s^2)
    lr: float = 5e-4
    min_lr_ratio: float = 0.1    # cosine schedule ends at min_lr_ratio * lr
    grad_clip: float = 1.0
    accumulation: int = 4        # examples per optimiser step (batch size is 1)
    epochs: int = 2
    clamp: float = 1.5           # s in [-clamp, clamp] after every step
    seed: int = 0                # example order per epoch

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.accumulation < 1:
            raise ValueError(f"epochs and accumulation must be at least 1, got {self.epochs} and {self.accumulation}")
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


def training_examples(items: Sequence[TaskItem]) -> list[Example]:
    """Teacher-forcing examples of dev items: the gold answer after the task prompt.

    Retrieval items give two: the true caption answered "Yes" and the first hard negative
    answered "No" (training on "Yes" alone would teach the model to say Yes to everything).
    """
    examples = []
    for item in items:
        examples.append(Example(item, item.prompt, item.answer))
        if TASKS[item.task].scoring == "yes/no":
            negatives = [p for i, p in enumerate(item.candidate_prompts) if i != item.positive]
            if not negatives:
                raise ValueError(f"retrieval item {item.record_index} has no negative candidate to train 'No' on")
            examples.append(Example(item, negatives[0], "No"))
    return examples


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
        history: "dev_ce" (mean answer-token CE on the dev examples before training and after
            every epoch), "train_loss" (mean total loss per epoch), "steps" (optimiser steps).
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
def dev_ce(vlm: VLM, examples: Sequence[Example], plan: Plan | None, *, batch_size: int = 16) -> float:
    """Mean (over examples) of the mean answer-token cross-entropy under `plan`."""
    values = []
    for start in range(0, len(examples), batch_size):
        encoded = encode_examples(vlm, examples[start:start + batch_size])
        with intervene(vlm.arch, plan if plan is not None else Plan()):
            logp, mask = answer_position_logprobs(vlm, encoded)
        targets = encoded.labels[:, -mask.shape[1]:].clamp(min=0)
        token_logp = logp.gather(-1, targets[..., None])[..., 0] * mask
        values.extend((-token_logp.sum(-1) / mask.sum(-1)).tolist())
    return sum(values) / len(values)


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


def learn_scales(vlm: VLM, items: Sequence[TaskItem], selection: Mapping[int, Sequence[int]], *,
                 cfg: SteerConfig = SteerConfig(), checkpoint: str | Path | None = None, batch_size: int = 16,
                 meta: Mapping | None = None, progress: bool = True) -> LearnResult:
    """Train one scale per selected neuron on `items` (the dev split), everything else frozen.

    Args:
        items: dev items of one task (retrieval: each gives a Yes and a No example).
        selection: {layer: [neuron, ...]} to scale.
        cfg: hyper-parameters (`SteerConfig`).
        checkpoint: a file to save training state to at every epoch boundary; if it exists,
            training continues from it (it must come from the same items, neurons and cfg).
        batch_size: for the dev-loss passes (training itself uses batch 1).
        meta: extra JSON-able fields stored in the returned `Scales.meta`.

    Returns:
        `LearnResult` with the scales and the dev-loss history.

    Raises:
        ProgressMismatchError (alias `SteeringProgressError`): `checkpoint` holds the state of a
            different training run.
    """
    if not items:
        raise ValueError("no dev items to learn scales on")
    examples = training_examples(items)
    layers, neurons = neuron_layout(selection)
    scale = torch.zeros(len(layers), dtype=torch.float32, requires_grad=True)   # on CPU; hooks move it
    optimizer = torch.optim.AdamW([scale], lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / cfg.accumulation)
    total = cfg.epochs * steps_per_epoch
    key = digest({"cfg": asdict(cfg), "layers": layers.tolist(), "neurons": neurons.tolist(), "model": vlm.name,
                   "examples": [(e.item.record_index, str(e.item.image_path), e.prompt, e.answer) for e in examples]})
    start_epoch, history = 0, {"dev_ce": [], "train_loss": [], "steps": 0}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        start_epoch, history = _load_checkpoint(path, key, scale, optimizer)
    if not history["dev_ce"]:
        history["dev_ce"].append(dev_ce(vlm, examples, None, batch_size=batch_size))
    task = items[0].task
    with frozen(vlm.model):
        for epoch in range(start_epoch, cfg.epochs):
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
            bar = tqdm(total=len(examples), desc=f"steer {task} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False)
            losses = []
            for k in range(steps_per_epoch):
                group = order[k * cfg.accumulation:(k + 1) * cfg.accumulation].tolist()
                for index in group:
                    plan = Plan.learned(layers, neurons, scale)   # fresh views of s after every step
                    loss, parts = example_loss(vlm, encode_examples(vlm, [examples[index]]), plan, scale, cfg)
                    (loss / len(group)).backward()
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(ce=f"{parts['ce']:.3f}", kl=f"{parts['kl']:.2g}")
                torch.nn.utils.clip_grad_norm_([scale], cfg.grad_clip)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = _lr(cfg, epoch * steps_per_epoch + k, total)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    scale.clamp_(-cfg.clamp, cfg.clamp)
            bar.close()
            history["steps"] += steps_per_epoch
            history["train_loss"].append(sum(losses) / len(losses))
            history["dev_ce"].append(dev_ce(vlm, examples, Plan.learned(layers, neurons, scale.detach()),
                                            batch_size=batch_size))
            if path is not None:
                _save_checkpoint(path, key, epoch + 1, scale, optimizer, history)
    info = {**dict(meta or {}), **asdict(cfg), "task": task, "model": vlm.name, "dev_examples": len(examples),
            "dev_ce": history["dev_ce"]}
    return LearnResult(Scales(layers=layers, neurons=neurons, scale=scale.detach().clone(), meta=info), history)
