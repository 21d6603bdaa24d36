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
position), "dvp" (c̄(θ), no head conditioning), "random" (drawn at selection time), and the
paper's activation-statistics baselines. The paper's text is not available to us; these are
our documented reading (DESIGN.md section 3), over every non-padding position of the task's
discovery prompt passes (image tokens included), pooled over items (token-weighted):

    AP_t(l,i)  = #{positions with z_{l,i} > 0} / #positions            ("ap")
    MA_t(l,i)  = Σ z_{l,i} / #positions                                 ("ma")
    p_t(l,i)   = AP_t / Σ_t' AP_t',  H(l,i) = -Σ_t p_t ln p_t  (0 ln 0 = 0)
    APE_t(l,i) = -H(l,i) if AP_t(l,i) = max_t' AP_t'(l,i) > 0, else APE_FLOOR     ("ape")

APE ranks the neurons most active on task t by low entropy across the four tasks (the
LAPE idea: low entropy = task-specific); the others get APE_FLOOR = -(ln T + 1), below
every real score (-H >= -ln T), so the matrix stays finite float32. APE needs every task's
AP, so `pipeline.rank` adds it once all four tasks are ranked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .distributed import Shard, take
from .errors import UnsupportedModelError
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
        for token in {t for ref in item.targets[:5] for t in vlm.target_token_ids(item.prompt, ref)}:
            df[token] += 1
    df = shard.sum(df)
    n = len(items)
    return {int(token): math.log((n + 1) / (float(df[token]) + 1)) + 1 for token in df.nonzero()[:, 0].tolist()}


def answer_weights(vlm: VLM, prompt: str, answer: str) -> dict[int, float]:
    """Uniform target weights of an answer: token id -> its number of occurrences in the answer tokens."""
    weights: dict[int, float] = {}
    for token in vlm.target_token_ids(prompt, answer):
        weights[token] = weights.get(token, 0.0) + 1.0
    return weights


def yes_weights(vlm: VLM) -> dict[int, float]:
    """The retrieval target: the "Yes" answer token, weight 1 (official mode: "Yes" encoded bare)."""
    if vlm.compat == "official":
        return answer_weights(vlm, "", "Yes")
    return {vlm.yes_no_ids()[0]: 1.0}


def target_weights(vlm: VLM, item: TaskItem, idf: dict[int, float] | None = None) -> dict[int, float]:
    """Token id -> weight w_t of the item's DVP target (the task table's target rule)."""
    rule = TASKS[item.task].target
    if rule == "yes":
        return yes_weights(vlm)
    if rule == "references":
        if idf is None:
            raise ValueError("caption targets need the IDF table of the discovery split (caption_token_idf)")
        # official mode: its five references joined by spaces, encoded (and cut to 128 tokens) as one text
        refs = [" ".join(item.targets[:5])] if vlm.compat == "official" else item.targets[:5]
        weights: dict[int, float] = {}
        for ref in refs:
            for token in vlm.target_token_ids(item.prompt, ref):
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
    """Running sums over items for one plan, `[L, I]` float64 each.

    Attributes:
        contributions: Σ c at the last prompt position.
        abs_activation: Σ |z| at the last prompt position.
        n: the number of items.
        positive, activation_sum: Σ [z > 0] and Σ z over every non-padding prompt position
            (the token statistics of AP / MA), when they were asked for (None otherwise).
        tokens: the number of those positions.
    """
    contributions: torch.Tensor
    abs_activation: torch.Tensor
    n: int = 0
    positive: torch.Tensor | None = None
    activation_sum: torch.Tensor | None = None
    tokens: int = 0

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.contributions.double() / self.n, self.abs_activation.double() / self.n

    @property
    def has_token_stats(self) -> bool:
        return self.positive is not None and self.activation_sum is not None


def activation_statistics(positive: torch.Tensor, total: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
    """AP and MA (our documented reading of the paper's baselines) from token sums.

    Args:
        positive: Σ [z > 0] over the prompt tokens, `[L, I]`.
        total: Σ z over the same tokens, `[L, I]`.
        tokens: how many tokens were summed.

    Returns:
        {"ap": P(z > 0), "ma": mean z}, `[L, I]` float64.
    """
    if tokens < 1:
        raise ValueError("AP / MA need at least one prompt token")
    return {"ap": positive.double() / tokens, "ma": total.double() / tokens}


APE_FLOOR_OFFSET = 1.0     # APE_FLOOR = -(ln T + APE_FLOOR_OFFSET): below every real score -H >= -ln T


def ape_scores(ap: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """APE of each task from every task's AP `[L, I]`: -H where the task's AP is highest, else the floor.

    p_t = AP_t / Σ_t' AP_t' and H = -Σ_t p_t ln p_t (0 ln 0 = 0), in float64. A neuron whose AP is
    the highest on several tasks (a tie) counts for each of them; a neuron never active on any
    task (Σ AP = 0) gets the floor everywhere. The floor is -(ln T + 1) for T tasks, below
    every real score; `select` breaks its ties by the lower flat index.

    Returns:
        task -> `[L, I]` float32, finite.
    """
    if len(ap) < 2:
        raise ValueError(f"APE compares tasks: it needs the AP of at least two, got {list(ap)}")
    stacked = torch.stack([a.double() for a in ap.values()])                 # [T, L, I]
    total = stacked.sum(0)
    p = stacked / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.where(p > 0, p * p.clamp_min(torch.finfo(torch.float64).tiny).log(), 0.0).sum(0)
    floor = -(math.log(len(ap)) + APE_FLOOR_OFFSET)
    best = stacked.max(0).values
    out = {}
    for t, task in enumerate(ap):
        mine = (stacked[t] == best) & (total > 0)
        out[task] = torch.where(mine, -entropy, floor).float()
    return out


@dataclass
class Attribution:
    """Neuron matrices of one task, each `[layers, intermediate]` float32."""
    importance: torch.Tensor
    baselines: dict[str, torch.Tensor] = field(default_factory=dict)
    fallback: bool = False
    conditioned_on: list[tuple[int, int]] = field(default_factory=list)


def _attention_mask(vlm: VLM, inputs: dict) -> torch.Tensor:
    if "attention_mask" not in inputs:
        raise UnsupportedModelError(f"{vlm.name}: the processor gives no attention_mask, so the prompt tokens of "
                                    "a padded batch (for AP / MA) cannot be told from the padding")
    return inputs["attention_mask"]


def _plan_sums(vlm: VLM, items: Sequence[TaskItem], plan: Plan | None, batches: Sequence[range],
               directions: torch.Tensor, token_stats: bool, bar) -> Sums:
    """One plan's sums over this process's batches (not yet reduced over processes)."""
    arch = vlm.arch
    shape = (arch.num_layers, arch.intermediate_size)
    contributions = torch.zeros(shape, dtype=torch.float64)
    abs_activation = torch.zeros(shape, dtype=torch.float64)
    positive = torch.zeros(shape, dtype=torch.float64) if token_stats else None
    activation_sum = torch.zeros(shape, dtype=torch.float64) if token_stats else None
    tokens = 0
    for batch in batches:
        chunk = items[batch.start:batch.stop]
        inputs = vlm.encode([item.load_image() for item in chunk], [item.prompt for item in chunk]).inputs
        mask = _attention_mask(vlm, inputs) if token_stats else None
        with intervene(arch, plan or Plan(), capture="last", token_mask=mask) as capture:
            vlm.last_hidden(inputs)
        u = directions[batch.start:batch.stop]                            # [b, hidden]
        for layer in range(arch.num_layers):     # layer by layer: a split model keeps each on its own GPU
            z = capture.neurons[layer].float()                                   # [b, I]
            down = arch.layers[layer].down_proj.weight                           # [hidden, I]
            c = write_in(z, readout(down.to(z.device), u))                       # [b, I]
            contributions[layer] += c.double().sum(0).cpu()
            abs_activation[layer] += z.abs().double().sum(0).cpu()
            if token_stats:
                positive[layer] += capture.stats.positive[layer].cpu()
                activation_sum[layer] += capture.stats.total[layer].cpu()
        tokens += capture.stats.tokens if token_stats else 0
        bar.update(len(chunk))
    return Sums(contributions, abs_activation, len(items), positive, activation_sum, tokens)


@torch.inference_mode()
def contribution_sums(vlm: VLM, items: Sequence[TaskItem], plans: Sequence[Plan | None], *,
                      idf: dict[int, float] | None = None, batch_size: int = 32,
                      done: dict[int, Sums] | None = None, token_stats: Sequence[int] = (),
                      on_plan: Callable[[int, Sums], None] | None = None, progress: bool = True,
                      shard: Shard = Shard()) -> list[Sums]:
    """DVP contribution sums for each plan, over all items (one forward per batch of items and plan).

    Args:
        done: sums of plans finished by an earlier run, by plan index; skipped (except a plan of
            `token_stats` whose saved sums lack token statistics, e.g. from an older version:
            it is run again).
        token_stats: the plans whose token statistics (Σ [z > 0], Σ z over every non-padding
            prompt position, for AP / MA) are summed too, in the same forward passes.
        on_plan: called with (plan index, sums) when a plan's items are all done (every process
            calls it with the sums over all processes).
        shard: this process's share of the batches; the sums are added up over processes.
    """
    directions = target_directions(vlm, items, idf)
    done = {p: s for p, s in (done or {}).items() if p not in token_stats or s.has_token_stats}
    results: list[Sums] = []
    todo = [p for p in range(len(plans)) if p not in done]
    batches = shard.batches(len(items), batch_size)
    bar = tqdm(total=len(todo) * sum(map(len, batches)), desc="neurons (DVP)", disable=not progress)
    for p, plan in enumerate(plans):
        if p in done:
            results.append(done[p])
            continue
        stats = p in token_stats
        part = _plan_sums(vlm, items, plan, batches, directions, stats, bar)
        sums = Sums(shard.sum(part.contributions), shard.sum(part.abs_activation), len(items),
                    shard.sum(part.positive) if stats else None, shard.sum(part.activation_sum) if stats else None,
                    int(shard.sum(torch.tensor(float(part.tokens)))) if stats else 0)
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
    """HONES importance and the activation / unconditioned-DVP / AP / MA baselines for one task.

    Only heads of `top_heads` with a positive score are ablated (the others have weight 0).
    AP and MA come from the unablated passes (plan 0), over every non-padding prompt token.
    Means, positive parts and the weighted sum are taken in float64 from the sums over all
    processes; the matrices are returned as float32. APE needs every task's AP (`ape_scores`).
    """
    by_idf = TASKS[items[0].task].target == "references"
    idf = caption_token_idf(vlm, items, shard=shard, batch_size=batch_size) if by_idf else None
    conditioned = [tuple(h) for h in top_heads if float(head_scores[tuple(h)]) > 0]
    plans: list[Plan | None] = [None] + [Plan.ablate_heads([h]) for h in conditioned]
    sums = contribution_sums(vlm, items, plans, idf=idf, batch_size=batch_size, done=done, token_stats=(0,),
                             on_plan=on_plan, progress=progress, shard=shard)
    base, activation = sums[0].mean()
    ablated = {head: s.mean()[0] for head, s in zip(conditioned, sums[1:])}
    importance, fallback = head_conditioned(base, ablated, head_scores)
    stats = activation_statistics(sums[0].positive, sums[0].activation_sum, sums[0].tokens)
    baselines = {"activation": activation.float(), "dvp": base.float(), "ap": stats["ap"].float(),
                 "ma": stats["ma"].float()}
    return Attribution(importance.float(), baselines, fallback, conditioned)


@torch.inference_mode()
def item_contributions(vlm: VLM, image, prompt: str, target_tokens: dict[int, float],
                       plans: Sequence[Plan | None]) -> torch.Tensor:
    """Write-in contributions `[len(plans), L, I]` for one input, one batch row per plan (for the app)."""
    layer_readouts = readouts(vlm, direction(vlm.arch.unembedding(), target_tokens))
    inputs = vlm.encode([image] * len(plans), [prompt] * len(plans)).inputs
    with intervene(vlm.arch, list(plans), capture="last") as capture, vlm.sharing(len(plans)):   # one image, many rows
        vlm.last_hidden(inputs)
    return torch.stack([contributions(capture.neurons, layer_readouts, row) for row in range(len(plans))])
