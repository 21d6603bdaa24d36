"""Per-neuron statistics of the FFN activation z over a task's discovery items (`NeuronStats`).

Measured where the method measures a neuron's write-in contribution (DESIGN.md section 3): z
at the last prompt position, the position whose output predicts the first answer token, one
value per item, no intervention. Retrieval items use the positive candidate's prompt, as
attribution does. Over the n items, per (layer, neuron):

    mean = Σ z / n,  std = sqrt(max(0, Σ z² / n - mean²)) (population),
    mean_abs = Σ |z| / n,  positive = #{z > 0} / n.

The sums are float64, so the one-pass variance loses nothing that matters at float32. The app's
neuron card compares a neuron's z on the visitor's input with these (`demo.neuron`); `rank`
stores them with every task, `pipeline.add_stats` adds them to an existing artifact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .distributed import Shard
from .interventions import Plan, intervene
from .models import VLM
from .rankings import STATS_POSITION, NeuronStats
from .tasks import TaskItem


@torch.inference_mode()
def activation_sums(vlm: VLM, items: Sequence[TaskItem], *, batch_size: int = 32, progress: bool = True,
                    shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """Σ z, Σ z², Σ |z| and Σ [z > 0] at the last prompt position over the items, summed over processes.

    Returns:
        {"sum", "square", "abs", "positive"}: each `[layers, intermediate]` float64 on the CPU.
    """
    arch = vlm.arch
    shape = (arch.num_layers, arch.intermediate_size)
    sums = {key: torch.zeros(shape, dtype=torch.float64) for key in ("sum", "square", "abs", "positive")}
    batches = shard.batches(len(items), batch_size)
    bar = tqdm(total=sum(map(len, batches)), desc="neuron statistics", disable=not progress)
    for batch in batches:
        chunk = items[batch.start:batch.stop]
        inputs = vlm.encode([item.load_image() for item in chunk], [item.prompt for item in chunk]).inputs
        # left-padded batch: position -1 is every row's last prompt token
        with intervene(arch, Plan(), capture="last") as capture:
            vlm.last_hidden(inputs, use_cache=False)
        for layer in range(arch.num_layers):
            z = capture.neurons[layer].double().cpu()                     # [b, I]
            sums["sum"][layer] += z.sum(0)
            sums["square"][layer] += (z * z).sum(0)
            sums["abs"][layer] += z.abs().sum(0)
            sums["positive"][layer] += (z > 0).double().sum(0)
        bar.update(len(chunk))
    bar.close()
    return {key: shard.sum(value) for key, value in sums.items()}


def stats_from_sums(sums: dict[str, torch.Tensor], items: int, *, data: dict | None = None) -> NeuronStats:
    """`NeuronStats` from `activation_sums` over `items` items.

    Raises:
        ValueError: no items.
    """
    if items < 1:
        raise ValueError("neuron statistics need at least one item")
    mean = sums["sum"] / items
    variance = (sums["square"] / items - mean * mean).clamp_min(0.0)
    return NeuronStats(mean=mean, std=variance.sqrt(), mean_abs=sums["abs"] / items,
                       positive=sums["positive"] / items, items=items, position=STATS_POSITION, data=data or {})


def discovery_stats(vlm: VLM, items: Sequence[TaskItem], *, batch_size: int = 32, data: dict | None = None,
                    progress: bool = True, shard: Shard = Shard()) -> NeuronStats:
    """The per-neuron statistics of z at the last prompt position over `items` (see the module text).

    Args:
        data: a description of the split to keep with them (file name, digest).
        shard: this process's share of the batches; the sums are added up over processes.

    Raises:
        ValueError: no items.
    """
    if not items:
        raise ValueError("neuron statistics need at least one item; the split has none for this task")
    sums = activation_sums(vlm, items, batch_size=batch_size, progress=progress, shard=shard)
    return stats_from_sums(sums, len(items), data=data)


__all__ = ["activation_sums", "stats_from_sums", "discovery_stats"]
