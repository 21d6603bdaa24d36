"""Head-conditioned FFN neuron attribution by direct vocabulary projection (DVP).

For an item with target tokens y, the write-in contribution of neuron i of layer l at the
last prompt position is

    c_{l,i} = z_{l,i} · <W_down[:, i], u_y>,   u_y = normalise(Σ_t w_t W_U[y_t]),

z the FFN activation (input of `down_proj`), W_U the unembedding. Targets per task: VQA
the gold answer's tokens, OCR the text's tokens, captioning the tokens of up to five
references weighted by smoothed IDF (idf = ln((N+1)/(df+1)) + 1, with df counted over the
discovery images' reference token sets), retrieval the "Yes" token on the positive
candidate. Weights are uniform except for captions.

Head-conditioned importance (DESIGN.md section 3):

    I_{l,i} = Σ_{h∈H*, S_h>0} S_h · [c̄_{l,i}(θ) - c̄_{l,i}(θ_{I_h})]₊ / Σ_{h∈H*, S_h>0} S_h,

c̄ the mean over discovery items, the positive part taken after averaging. With no head
scoring above zero, the importance falls back to c̄(θ) and says so.

Comparison rankings at the same budget: "activation" (mean |z| at the last prompt
position), "dvp" (c̄(θ), no head conditioning) and "random" (drawn at selection time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .distributed import Shard, take
from .interventions import Plan, intervene
from .models import VLM
from .tasks import TASKS, TaskItem


def caption_token_idf(vlm: VLM, items: Sequence[TaskItem], *, shard: Shard = Shard(),
                      batch_size: int = 32) -> dict[int, float]:
    """Smoothed IDF of answer tokens over the items' images (each image's references = one document).

    With several processes each counts the documents of its batches; the counts are summed
    over processes before the IDF is taken.
    """
    df = torch.zeros(vlm.arch.unembedding().shape[0], dtype=torch.float64)
    for item in take(items, shard.batches(len(items), batch_size)):
        for token in {t for ref in item.targets[:5] for t in vlm.answer_token_ids(item.prompt, ref)}:
            df[token] += 1
    df = shard.sum(df)
    n = len(items)
    return {int(token): math.log((n + 1) / (float(df[token]) + 1)) + 1 for token in df.nonzero()[:, 0].tolist()}


def answer_weights(vlm: VLM, prompt: str, answer: str) -> dict[int, float]:
    """Uniform target weights of an answer: token id -> its number of occurrences in the answer tokens."""
    weights: dict[int, float] = {}
    for token in vlm.answer_token_ids(prompt, answer):
        weights[token] = weights.get(token, 0.0) + 1.0
    return weights


def yes_weights(vlm: VLM) -> dict[int, float]:
    """The retrieval target: the "Yes" answer token, weight 1."""
    return {vlm.yes_no_ids()[0]: 1.0}


def target_weights(vlm: VLM, item: TaskItem, idf: dict[int, float] | None = None) -> dict[int, float]:
    """Token id -> weight w_t of the item's DVP target (the task table's target rule)."""
    rule = TASKS[item.task].target
    if rule == "yes":
        return yes_weights(vlm)
    if rule == "references":
        if idf is None:
            raise ValueError("caption targets need the IDF table of the discovery split (caption_token_idf)")
        weights: dict[int, float] = {}
        for ref in item.targets[:5]:
            for token in vlm.answer_token_ids(item.prompt, ref):
                weights[token] = weights.get(token, 0.0) + idf.get(token, 1.0)
        return weights
    return answer_weights(vlm, item.prompt, item.answer)


def direction(unembedding: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
    """u_y = normalise(Σ_t w_t W_U[y_t]), `[hidden]` float32 (only the target tokens' rows are read).

    Args:
        unembedding: W_U, `[vocab, hidden]` (`arch.unembedding()`).
        weights: token id -> w_t (`target_weights`).
    """
    ids = torch.tensor(list(weights), device=unembedding.device)
    w = torch.tensor(list(weights.values()), device=unembedding.device, dtype=torch.float32)
    u = (w[:, None] * unembedding[ids].detach().float()).sum(0)
    return u / u.norm().clamp_min(1e-12)


def target_directions(vlm: VLM, items: Sequence[TaskItem], idf: dict[int, float] | None = None) -> torch.Tensor:
    """u_y for every item, `[n, hidden]` float32, unit norm."""
    unembedding = vlm.arch.unembedding()
    return torch.stack([direction(unembedding, target_weights(vlm, item, idf)) for item in items])


def readout(down_weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """<W_down[:, i], u_y> for every neuron i: `[..., intermediate]` float32 from u `[..., hidden]`.

    Args:
        down_weight: the layer's `down_proj.weight`, `[hidden, intermediate]`.
        u: one direction `[hidden]` or one per row `[b, hidden]`.
    """
    return u.to(down_weight.device).float() @ down_weight.detach().float()


def readouts(vlm: VLM, u: torch.Tensor) -> list[torch.Tensor]:
    """`readout` of one direction u `[hidden]` for every layer: a list of `[intermediate]` float32.

    The app caches this per answer direction, so a slider move does not copy `down_proj` again.
    """
    return [readout(layer.down_proj.weight, u) for layer in vlm.arch.layers]


def write_in(z: torch.Tensor, readout_: torch.Tensor) -> torch.Tensor:
    """c_{l,i} = z_{l,i} · <W_down[:, i], u_y>: FFN activations `[..., intermediate]` times their readout."""
    return z.float() * readout_.to(z.device)


def contributions(neurons: dict[int, torch.Tensor], layer_readouts: Sequence[torch.Tensor], row: int) -> torch.Tensor:
    """Write-in contributions of one batch row, `[layers, intermediate]` float32 on the CPU.

    Args:
        neurons: captured activations at the last prompt position, layer -> `[batch, intermediate]`
            (`Capture.neurons` of `intervene(..., capture="last")`).
        layer_readouts: `readouts(vlm, u_y)`.
        row: the batch row.
    """
    return torch.stack([write_in(neurons[layer][row], r).cpu() for layer, r in enumerate(layer_readouts)])


@dataclass
class Sums:
    """Running sums over items for one plan: Σ c `[L, I]`, Σ |z| `[L, I]` (float64) and the item count."""
    contributions: torch.Tensor
    abs_activation: torch.Tensor
    n: int = 0

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.contributions.double() / self.n, self.abs_activation.double() / self.n


@dataclass
class Attribution:
    """Neuron matrices of one task, each `[layers, intermediate]` float32."""
    importance: torch.Tensor
    baselines: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback: bool = False
    conditioned_on: list[tuple[int, int]] = field(default_factory=list)


@torch.inference_mode()
def contribution_sums(vlm: VLM, items: Sequence[TaskItem], plans: Sequence[Plan | None], *,
                      idf: dict[int, float] | None = None, batch_size: int = 32,
                      done: dict[int, Sums] | None = None,
                      on_plan: Callable[[int, Sums], None] | None = None, progress: bool = True,
                      shard: Shard = Shard()) -> list[Sums]:
    """DVP contribution sums for each plan, over all items (one forward per batch of items and plan).

    Args:
        done: sums of plans finished by an earlier run, by plan index; skipped.
        on_plan: called with (plan index, sums) when a plan's items are all done (every process
            calls it with the sums over all processes).
        shard: this process's share of the batches; the sums are added up over processes.
    """
    arch = vlm.arch
    directions = target_directions(vlm, items, idf)
    down = [layer.down_proj.weight for layer in arch.layers]        # [hidden, I] each, on its layer's device
    done = dict(done or {})
    results: list[Sums] = []
    todo = [p for p in range(len(plans)) if p not in done]
    batches = shard.batches(len(items), batch_size)
    bar = tqdm(total=len(todo) * sum(map(len, batches)), desc="neurons (DVP)", disable=not progress)
    for p, plan in enumerate(plans):
        if p in done:
            results.append(done[p])
            continue
        contributions = torch.zeros(arch.num_layers, arch.intermediate_size, dtype=torch.float64)
        abs_activation = torch.zeros(arch.num_layers, arch.intermediate_size, dtype=torch.float64)
        for batch in batches:
            chunk = items[batch.start:batch.stop]
            inputs = vlm.encode([item.load_image() for item in chunk], [item.prompt for item in chunk]).inputs
            with intervene(arch, plan or Plan(), capture="last") as capture:
                vlm.last_hidden(inputs)
            u = directions[batch.start:batch.stop]                            # [b, hidden]
            for layer in range(arch.num_layers):     # layer by layer: a split model keeps each on its own GPU
                z = capture.neurons[layer].float()                                   # [b, I]
                c = write_in(z, readout(down[layer].to(z.device), u))              # [b, I]
                contributions[layer] += c.double().sum(0).cpu()
                abs_activation[layer] += z.abs().double().sum(0).cpu()
            bar.update(len(chunk))
        sums = Sums(shard.sum(contributions), shard.sum(abs_activation), len(items))
        results.append(sums)
        if on_plan is not None:
            on_plan(p, sums)
    bar.close()
    return results


def head_conditioned(base: torch.Tensor, ablated: dict[tuple[int, int], torch.Tensor],
                     head_scores: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """I = Σ S_h [c̄(θ) - c̄(θ_{I_h})]₊ / Σ S_h over heads with S_h > 0; (importance, fell back?)."""
    positive = {head: float(head_scores[head]) for head in ablated if float(head_scores[head]) > 0}
    if not positive:
        return base.clone(), True
    total = sum(positive.values())
    importance = torch.zeros_like(base)
    for head, score in positive.items():
        importance += score * (base - ablated[head]).clamp_min(0)
    return importance / total, False


def attribute(vlm: VLM, items: Sequence[TaskItem], top_heads: Sequence[tuple[int, int]],
              head_scores: torch.Tensor, *, batch_size: int = 32, done: dict[int, Sums] | None = None,
              on_plan: Callable[[int, Sums], None] | None = None, progress: bool = True,
              shard: Shard = Shard()) -> Attribution:
    """HONES importance and the activation / unconditioned-DVP baselines for one task.

    Only heads of `top_heads` with a positive score are ablated (the others have weight 0).
    Means, positive parts and the weighted sum are taken in float64 from the sums over all
    processes; the matrices are returned as float32.
    """
    by_idf = TASKS[items[0].task].target == "references"
    idf = caption_token_idf(vlm, items, shard=shard, batch_size=batch_size) if by_idf else None
    conditioned = [tuple(h) for h in top_heads if float(head_scores[tuple(h)]) > 0]
    plans: list[Plan | None] = [None] + [Plan.ablate_heads([h]) for h in conditioned]
    sums = contribution_sums(vlm, items, plans, idf=idf, batch_size=batch_size, done=done, on_plan=on_plan,
                             progress=progress, shard=shard)
    base, activation = sums[0].mean()
    ablated = {head: s.mean()[0] for head, s in zip(conditioned, sums[1:])}
    importance, fallback = head_conditioned(base, ablated, head_scores)
    return Attribution(importance.float(), {"activation": activation.float(), "dvp": base.float()}, fallback,
                       conditioned)


@torch.inference_mode()
def item_contributions(vlm: VLM, image, prompt: str, target_tokens: dict[int, float],
                       plans: Sequence[Plan | None]) -> torch.Tensor:
    """Write-in contributions `[len(plans), L, I]` for one input, one batch row per plan (for the app)."""
    layer_readouts = readouts(vlm, direction(vlm.arch.unembedding(), target_tokens))
    inputs = vlm.encode([image] * len(plans), [prompt] * len(plans)).inputs
    with intervene(vlm.arch, list(plans), capture="last") as capture, vlm.sharing(len(plans)):   # one image, many rows
        vlm.last_hidden(inputs)
    return torch.stack([contributions(capture.neurons, layer_readouts, row) for row in range(len(plans))])
