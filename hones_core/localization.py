"""Critical-head localization: score every text-decoder head by mean-replacement ablation.

S(l, h) = P_t(θ) - P_t(θ_{I_h}), where P_t is the utility on the discovery items and θ_{I_h}
the model with head h of layer l mean-replaced at every position. Two utilities:
- "metric" (the paper's): the task metric from greedy decoding;
- "logprob" (fast): the mean per-token teacher-forced log-probability of the gold answer.

The straightforward algorithm runs 1 + L·H full evaluations one item at a time
(`score_heads_reference`). `score_heads` gives the same scores with far less work:
- **start each ablation at its layer**: the base pass runs once per chunk of items and keeps
  every decoder layer's inputs (`sharing.trace_layers`); a row (item, head of layer l) runs
  layers l.. only, since mean-replacing a head of layer l leaves layers < l as they were;
- **verify, then decode**: for greedy answers, one teacher-forced pass over prompt + the base
  answer tells, per row, whether the ablated greedy answer is the base answer (argmax equal
  at every answer position and at the stop); only rows that depart are decoded on, from the
  verified prefix. A row whose top-2 logit gap is near a tie at a position it relies on is
  decoded step by step from the prompt, the reference's own computation, so rounding between
  batched and single runs cannot change an answer;
- retrieval candidates of an item run the vision tower once and share one base pass.
Results are reported per layer to an optional callback, which is what makes long runs
resumable. `utilities` (a list of plans, batched (item, plan) rows) serves masking and steering.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import metrics
from .distributed import Shard
from .evaluation import MAX_NEW_TOKENS, gold_logprob, predict, references
from .interventions import Plan
from .models import VLM, Greedy
from .sharing import LayerTrace, share_images
from .tasks import TASKS, TaskItem, clean_answer

UTILITIES = ("metric", "logprob")
TRACE_MEMORY = 2 << 30      # 2 GiB of base traces kept across layers (12 LLaVA-7B items, thousands of toy ones)


@dataclass
class HeadScores:
    """Head scores of one task.

    Attributes:
        scores: S(l, h), `[layers, heads]` float32 (utility drop when the head is mean-replaced).
        base: P_t(θ), the utility of the unmodified model.
        utility: "metric" or "logprob".
        counts: what `score_heads` did with its rows (empty from the reference loop):
            rows — (item or retrieval candidate, head) rows scored;
            verified — rows whose greedy answer is the base answer, shown by one teacher-forced pass;
            departed — rows whose teacher-forced argmax left the base answer (position histogram in
            departures); decoded — of them, those decoded on (the others stopped at the departure);
            near_tie — rows decoded step by step from the prompt alone because a top-2 logit gap was
            under the threshold (`default_near_tie`); untraced_rows — rows decoded alone because the
            answer holds a special token that is not a stop (an image placeholder); disagreed — rows
            decoded alone whose answer differs from the teacher-forced guess, plus base answers whose
            teacher-forced argmax differs from their greedy tokens; base_near_tie — base answers
            decoded alone; traces — base passes run; answer_tokens — mean base answer length.
    """
    scores: torch.Tensor
    base: float
    utility: str
    counts: dict = field(default_factory=dict)

    def top(self, k: int) -> list[tuple[int, int]]:
        """The k highest-scoring (layer, head) pairs, best first (ties: lower layer, then head)."""
        flat = self.scores.flatten()
        k = max(1, min(k, flat.numel()))
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
        heads = self.scores.shape[1]
        return [(i // heads, i % heads) for i in order]


def default_top_heads(num_layers: int, num_heads: int) -> int:
    """K_h when none is given: round(3 % of all heads), at least 4.

    LLaVA-1.5-7B has 32 x 32 = 1 024 heads, so the rule gives round(30.72) = 31; the paper's
    configs set K_h explicitly (30 for LLaVA-1.5-7B, 25 for Qwen2.5-VL-7B). The rule is for
    other models; pass `top_heads` to use the paper's value.
    """
    return max(4, round(0.03 * num_layers * num_heads))


def _check_utility(utility: str) -> None:
    if utility not in UTILITIES:
        raise ValueError(f"utility must be one of {', '.join(UTILITIES)}, not {utility!r}")


def utility_of(vlm: VLM, items: Sequence[TaskItem], plans: Plan | Sequence[Plan | None] | None, utility: str,
               *, batch_size: int, shard: Shard = Shard()) -> float:
    """P_t under one plan for all items."""
    return utilities(vlm, items, [plans], utility, batch_size=batch_size, shard=shard)[0]


def utilities(vlm: VLM, items: Sequence[TaskItem], plans: Sequence[Plan | None], utility: str, *,
              batch_size: int, progress: bool = False, shard: Shard = Shard()) -> list[float]:
    """P_t for each plan in `plans`, computed in shared batches of (item, plan) rows.

    With several processes (`shard`), each runs its share of the batches and the metric
    statistics of every plan are summed over processes before the metric is taken.
    """
    _check_utility(utility)
    # item-major rows: a batch holds each item under all plans, so its image is processed once
    # and the layers before the first one where the plans differ run once (sharing.share_prefix)
    k = len(plans)
    rows = [item for item in items for _ in plans]
    row_plans = [plan for _ in items for plan in plans]
    task = items[0].task
    metric = TASKS[task].metric
    refs = references(items)
    stats = torch.zeros(len(plans), 2 if utility == "logprob" else metrics.statistics_size(metric),
                        dtype=torch.float64)
    batches = shard.batches(len(rows), batch_size)
    for batch in tqdm(batches, desc=f"{task} ({utility})", disable=not progress, leave=False):
        chunk, chunk_plans = [rows[i] for i in batch], [row_plans[i] for i in batch]
        if utility == "logprob":
            values = gold_logprob(vlm, chunk, plans=chunk_plans, batch_size=batch_size).double()
        else:
            predictions = predict(vlm, chunk, plans=chunk_plans, batch_size=batch_size)
        for p in sorted({r % k for r in batch}):
            mine = [j for j, r in enumerate(batch) if r % k == p]      # positions in the batch of plan p's rows
            if utility == "logprob":
                stats[p] += torch.tensor([float(values[mine].sum()), len(mine)], dtype=torch.float64)
            else:
                stats[p] += torch.tensor(metrics.statistics(metric, [predictions[j] for j in mine],
                                                            [refs[batch[j] // k] for j in mine]), dtype=torch.float64)
    stats = shard.sum(stats)
    if utility == "logprob":
        return [float(s[0] / s[1]) for s in stats]
    return [float(metrics.from_statistics(metric, s.tolist())) for s in stats]


@torch.inference_mode()
def score_heads(vlm: VLM, items: Sequence[TaskItem], *, utility: str = "metric", batch_size: int = 32,
                done: dict[int, list[float]] | None = None, base: float | None = None,
                on_layer: Callable[[int, list[float]], None] | None = None, progress: bool = True,
                shard: Shard = Shard(), near_tie: float | None = None,
                trace_memory: int = TRACE_MEMORY) -> HeadScores:
    """Score every head of every text layer; the same scores as `score_heads_reference`, much faster.

    The base pass runs once per item, keeping each decoder layer's inputs (`VLM.trace`); a row
    (item, head of layer l) starts at layer l from them. For the metric utility of generating
    tasks, each row is first checked teacher-forced over prompt + the base greedy answer: where
    the argmax at every answer position is the base token (and the stop after it), the row's
    greedy answer *is* the base answer; a row that departs at position k is decoded on from the
    verified prefix and its token k (re-decoded from prompt + prefix, under the row's plan). A row
    with a top-2 logit gap under `near_tie` (relative, see `tie_threshold`) at any position it
    relies on is decoded step by step from the prompt alone, exactly as the reference does.

    Args:
        utility: "metric" (greedy answers scored by the task metric) or "logprob".
        batch_size: rows (item or candidate, head) per batched pass.
        done: scores of layers finished by an earlier run (`{layer: [score per head]}`); skipped.
        base: P_t(θ) from an earlier run (recomputed when None).
        on_layer: called with (layer, scores) after each layer, e.g. to save progress.
        shard: this process's share of the items when several processes run (statistics are summed).
        near_tie: relative top-2 gap under which a row is decoded step by step (default by dtype,
            `default_near_tie`).
        trace_memory: bytes of base traces kept across layers; past it, a chunk's base pass is
            run again for each layer (see `trace_bytes_per_item` for what one item costs).

    Returns:
        `HeadScores`, with `counts` saying how many rows were verified, decoded, and so on.

    Raises:
        ValueError: an unknown utility, or no items.
    """
    _check_utility(utility)
    if not items:
        raise ValueError("no items to score heads on")
    arch = vlm.arch
    done = dict(done or {})
    engine = _Engine(vlm, items, utility, batch_size=batch_size, shard=shard,
                     near_tie=default_near_tie(vlm) if near_tie is None else near_tie, trace_memory=trace_memory)
    computed = engine.base_value()
    base = computed if base is None else base
    for layer in tqdm(range(arch.num_layers), desc=f"heads ({utility})", disable=not progress):
        if layer in done:
            continue
        done[layer] = [base - value for value in engine.layer_values(layer)]
        if on_layer is not None:
            on_layer(layer, done[layer])
    scores = torch.tensor([done[layer] for layer in range(arch.num_layers)], dtype=torch.float32)
    return HeadScores(scores, float(base), utility, counts=engine.summary())


@torch.inference_mode()
def ablated_answers(vlm: VLM, items: Sequence[TaskItem], layer: int, *, batch_size: int = 32,
                    near_tie: float | None = None) -> tuple[list[list[str]], dict]:
    """Greedy answers of each item with each head of `layer` mean-replaced, the way `score_heads` finds them.

    Verified teacher-forced against the base answer, decoded on only where they depart (see
    `score_heads`); what `predict` would return before cleaning (`VLM.generate`'s text).

    Args:
        items: items of a generating task (VQA, OCR, caption).

    Returns:
        `answers[i][h]`, the answer of item i with head h of `layer` mean-replaced, and the counts
        (`HeadScores.counts`).

    Raises:
        ValueError: items of a task scored by yes/no margins (retrieval), or no items.
    """
    if not items or TASKS[items[0].task].scoring != "generate":
        raise ValueError("ablated_answers takes items of a generating task (vqa, ocr, caption)")
    engine = _Engine(vlm, items, "metric", batch_size=batch_size, shard=Shard(),
                     near_tie=default_near_tie(vlm) if near_tie is None else near_tie, trace_memory=0)
    engine.base_value()
    answers = [[""] * engine.heads for _ in items]
    for chunk in engine.chunks:
        engine.ensure_trace(chunk, layer)
        engine.counts["rows"] += len(chunk.items) * engine.heads
        for (k, h), text in engine.verify(chunk, layer).items():
            answers[chunk.items[k]][h] = text
        engine.release(chunk)
    return answers, engine.summary()


def default_near_tie(vlm: VLM) -> float:
    """The relative top-2 gap under which an answer is decoded step by step: 1e-4 in float32.

    Rows batched differently agree to float rounding (measured <= 1e-6 relative on CPU in float32),
    so a gap of 1e-4 x max(1, |best logit|) cannot be closed by rounding. In bfloat16/float16 the
    rounding is larger: 4 x the dtype's epsilon (3.1e-2 for bfloat16, 3.9e-3 for float16).
    """
    dtype = next(vlm.model.parameters()).dtype
    return 1e-4 if dtype == torch.float32 or dtype == torch.float64 else 4 * torch.finfo(dtype).eps


def tie_mask(gaps: torch.Tensor, best: torch.Tensor, near_tie: float) -> torch.Tensor:
    """Where the top-2 gap is under the threshold: gap < near_tie x max(1, |best logit|) (same shapes)."""
    return gaps < near_tie * best.abs().clamp(min=1.0)


def trace_bytes_per_item(*, layers: int, tokens: int, hidden: int, bytes_per_value: int, rows: int = 1) -> int:
    """What keeping one item's base pass costs: the inputs of every layer (rows x layers x tokens x hidden x dtype).

    LLaVA-1.5-7B in bfloat16 (32 layers, hidden 4096, 576 image + ~40 prompt + 24 answer tokens):
    32 x 640 x 4096 x 2 = 168 MB per item (the attention mask, [tokens, tokens], adds < 1 MB). A
    retrieval item is one row per candidate: 50 x 168 MB = 8.4 GB. Past `trace_memory`, a base
    pass keeps one layer's inputs at a time (1 / layers of that: 5.2 MB per row, 262 MB per
    retrieval item) and runs again for each layer, which costs one more base pass per item and
    layer next to its `heads` ablated rows.
    """
    return rows * LayerTrace.bytes_per_row(layers=layers, tokens=tokens, hidden=hidden, bytes_per_value=bytes_per_value)


@dataclass
class _Chunk:
    """One chunk of items: its base pass and what each row is checked against."""
    items: list[int]                  # indices into the task's items
    sequences: list[int]              # per traced row, its item's position in `items` (retrieval: one per candidate)
    trace: LayerTrace | None = None
    encoded: dict | None = None       # prompt-only processor outputs (generating tasks: decoding on)
    base_tokens: list[list[int]] = field(default_factory=list)   # generating: base greedy tokens per item
    labels: torch.Tensor | None = None  # logprob: [rows, seq] labels of the gold answers
    kept: bool = False                # its trace is kept across layers (within the memory budget)
    untraced: set[int] = field(default_factory=set)   # items whose base answer holds a placeholder token


class _Engine:
    """Head scores of one task from per-item base passes (see `score_heads`)."""

    def __init__(self, vlm: VLM, items: Sequence[TaskItem], utility: str, *, batch_size: int, shard: Shard,
                 near_tie: float, trace_memory: int):
        self.vlm, self.items, self.utility = vlm, list(items), utility
        self.task = items[0].task
        if any(item.task != self.task for item in items):
            raise ValueError("score_heads takes items of one task at a time")
        self.kind = "logprob" if utility == "logprob" else TASKS[self.task].scoring     # logprob | generate | yes/no
        self.metric = TASKS[self.task].metric
        self.refs = references(self.items)
        self.batch_size, self.shard, self.near_tie, self.trace_memory = batch_size, shard, near_tie, trace_memory
        self.heads = vlm.arch.num_heads
        per_item = len(items[0].candidates) if self.kind == "yes/no" else 1
        size = max(1, batch_size // (self.heads * per_item))
        self.chunks = [_Chunk(list(r), []) for r in shard.batches(len(self.items), size)]
        self.kept_bytes = 0
        self.images: dict[int, object] = {}
        self.counts = {"rows": 0, "verified": 0, "departed": 0, "decoded": 0, "near_tie": 0, "disagreed": 0,
                       "base_near_tie": 0, "untraced": 0, "untraced_rows": 0,
                       "traces": 0}
        self.departures: dict[int, int] = {}
        self.answer_lengths: list[int] = []
        self.stats_cache: dict[tuple[int, str], torch.Tensor] = {}
        # special tokens other than the stops (image placeholders, ...): a sequence holding one cannot be
        # run teacher-forced (the model would look for an image's features there); such rows decode alone
        self.unsafe = set(vlm.tokenizer.all_special_ids) - set(vlm.stop_ids)

    # ----- helpers ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        """The counts, the departure positions and the mean base answer length (tokens, stop included)."""
        lengths = self.answer_lengths
        return {**self.counts, "departures": dict(sorted(self.departures.items())),
                **({"answer_tokens": sum(lengths) / len(lengths)} if lengths else {})}

    def image(self, i: int):
        if i not in self.images:
            self.images[i] = self.items[i].load_image()
        return self.images[i]

    def stats_size(self) -> int:
        return 2 if self.kind == "logprob" else metrics.statistics_size(self.metric)

    def value(self, stats: torch.Tensor) -> float:
        if self.kind == "logprob":
            return float(stats[0] / stats[1])
        return float(metrics.from_statistics(self.metric, stats.tolist()))

    def same(self, a: int, b: int) -> bool:
        """Two greedy tokens give the same answer here: equal, or both stop tokens (stops are not in the text)."""
        return a == b or (a in self.vlm.stop_ids and b in self.vlm.stop_ids)

    # ----- the base pass -------------------------------------------------------------------------
    def base_value(self) -> float:
        """P_t(θ) over all items (summed over processes); prepares every chunk's base answers."""
        stats = torch.zeros(self.stats_size(), dtype=torch.float64)
        for chunk in self.chunks:
            stats += self.prepare(chunk)
            self.release(chunk)
        return self.value(self.shard.sum(stats))

    def prepare(self, chunk: _Chunk) -> torch.Tensor:
        """Base answers of a chunk (generating tasks) and its base pass; returns the base statistics."""
        vlm, items = self.vlm, [self.items[i] for i in chunk.items]
        images = [self.image(i) for i in chunk.items]
        if self.kind == "generate":
            chunk.encoded = vlm.encode(images, [it.prompt for it in items]).inputs
            chunk.sequences = list(range(len(items)))
            rows = vlm.greedy(chunk.encoded, max_new_tokens=MAX_NEW_TOKENS)
            for k, row in enumerate(rows):
                if tie_mask(torch.tensor(row.gaps), torch.tensor(row.best), self.near_tie).any():
                    # batched and single runs could pick different tokens here: take the reference's own run
                    self.counts["base_near_tie"] += 1
                    rows[k] = self.decode_alone(chunk.items[k], None)
            chunk.base_tokens = [row.tokens for row in rows]
            self.answer_lengths.extend(len(t) for t in chunk.base_tokens)
            chunk.untraced = {k for k, t in enumerate(chunk.base_tokens) if self.unsafe.intersection(t)}
            self.counts["untraced"] += len(chunk.untraced)
            stats = sum(self.item_stats(i, clean_answer(vlm.decode_answer(t), self.task))
                        for i, t in zip(chunk.items, chunk.base_tokens))
        elif self.kind == "yes/no":
            chunk.sequences = [k for k, it in enumerate(items) for _ in it.candidates]
            stats = None
        else:
            chunk.sequences = list(range(len(items)))
            stats = None
        hidden = self.ensure_trace(chunk)
        if self.kind == "generate":
            # the base pass itself, teacher-forced: its argmax should be the greedy tokens
            width = max(1, max(len(self.traced_tokens(chunk, k)) for k in range(len(chunk.items))))
            predicted = self.vlm.unembed(hidden[:, -width:, :]).argmax(-1)
            for k, tokens in enumerate(chunk.base_tokens):
                if k in chunk.untraced:
                    continue
                guess = predicted[k, width - len(tokens):].tolist()
                if not all(self.same(p, t) for p, t in zip(guess, tokens)):
                    self.counts["disagreed"] += 1
            return stats
        if self.kind == "yes/no":
            margins = vlm.yes_no_margins(vlm.unembed(hidden[:, -1:, :])[:, 0, :])
            return torch.tensor(self.retrieval_stats(chunk, margins), dtype=torch.float64)
        values = self.mean_logprobs(chunk, hidden, range(len(chunk.items)))
        return torch.tensor([float(values.double().sum()), len(chunk.items)], dtype=torch.float64)

    def ensure_trace(self, chunk: _Chunk, layer: int | None = None) -> torch.Tensor | None:
        """Run the chunk's base pass unless what `layer` needs is kept; returns its final hidden states when it ran.

        The first pass (`layer` None) keeps every layer's inputs when they fit in what is left of
        `trace_memory`, and none otherwise; a pass for `layer` then keeps that layer's only
        (`[rows, seq, hidden]`), so memory stays bounded whatever the number of items.
        """
        if chunk.trace is not None and (layer is None or chunk.trace.hidden[layer] is not None):
            return None
        vlm, items = self.vlm, [self.items[i] for i in chunk.items]
        images = [self.image(i) for i in chunk.items]
        if self.kind == "generate":
            inputs = vlm.extend_inputs(chunk.encoded, [self.traced_tokens(chunk, k)[:-1]
                                                       for k in range(len(chunk.items))])
        elif self.kind == "yes/no":
            inputs = vlm.encode([images[k] for k in chunk.sequences],
                                [p for it in items for p in it.candidate_prompts]).inputs
        else:
            encoded = vlm.encode(images, [it.prompt for it in items], [it.answer for it in items])
            inputs, chunk.labels = encoded.inputs, encoded.labels
        if layer is None:
            rows, tokens = inputs["input_ids"].shape
            estimate = rows * LayerTrace.bytes_per_row(
                layers=vlm.arch.num_layers, tokens=tokens, hidden=int(vlm.model.config.get_text_config().hidden_size),
                bytes_per_value=next(vlm.model.parameters()).element_size())
            keep = None if self.kept_bytes + estimate <= self.trace_memory else ()
        else:
            keep = (layer,)
        # candidates of one item carry one image: the vision tower runs once for them
        with share_images(vlm.arch):
            chunk.trace, hidden = vlm.trace(inputs, keep=keep)
        if keep is None:
            self.kept_bytes += chunk.trace.nbytes()
            chunk.kept = True
        self.counts["traces"] += 1
        return hidden

    def traced_tokens(self, chunk: _Chunk, k: int) -> list[int]:
        """The base tokens of item k that its trace holds (none for an untraced item: it decodes alone)."""
        return [] if k in chunk.untraced else chunk.base_tokens[k]

    def release(self, chunk: _Chunk) -> None:
        """Drop the chunk's trace unless it is kept across layers (within `trace_memory`)."""
        if not chunk.kept:
            chunk.trace = None

    # ----- one layer -------------------------------------------------------------------------------
    def layer_values(self, layer: int) -> list[float]:
        """P_t(θ_{I_h}) for every head h of `layer` (summed over processes)."""
        stats = torch.zeros(self.heads, self.stats_size(), dtype=torch.float64)
        for chunk in self.chunks:
            self.ensure_trace(chunk, layer)
            stats += self.layer_chunk(chunk, layer)
            self.release(chunk)
        stats = self.shard.sum(stats)
        return [self.value(s) for s in stats]

    def row_batches(self, chunk: _Chunk, layer: int):
        """(sequence, head) rows of a chunk in batches of `batch_size`, with their one-head plans."""
        rows = [(s, h) for s in range(len(chunk.sequences)) for h in range(self.heads)]
        for start in range(0, len(rows), self.batch_size):
            part = rows[start:start + self.batch_size]
            yield part, [Plan.ablate_heads([(layer, h)]) for _, h in part]

    def layer_chunk(self, chunk: _Chunk, layer: int) -> torch.Tensor:
        vlm = self.vlm
        stats = torch.zeros(self.heads, self.stats_size(), dtype=torch.float64)
        self.counts["rows"] += len(chunk.sequences) * self.heads
        if self.kind == "logprob":
            width = int((chunk.labels != -100).sum(-1).max())
            for part, plans in self.row_batches(chunk, layer):
                logits = vlm.logits_from_layer(chunk.trace, layer, [s for s, _ in part], plans=plans,
                                               last=width + 1)
                values = self.mean_logprobs(chunk, logits, [s for s, _ in part], logits=True)
                for (s, h), v in zip(part, values.tolist()):
                    stats[h] += torch.tensor([v, 1.0], dtype=torch.float64)
            return stats
        if self.kind == "yes/no":
            margins = torch.empty(len(chunk.sequences), self.heads)
            for part, plans in self.row_batches(chunk, layer):
                logits = vlm.logits_from_layer(chunk.trace, layer, [s for s, _ in part], plans=plans, last=1)
                for (s, h), m in zip(part, vlm.yes_no_margins(logits[:, 0, :]).tolist()):
                    margins[s, h] = m
            for h in range(self.heads):
                stats[h] += torch.tensor(self.retrieval_stats(chunk, margins[:, h]), dtype=torch.float64)
            return stats
        answers = self.verify(chunk, layer)
        for (k, h), text in answers.items():
            stats[h] += self.item_stats(chunk.items[k], clean_answer(text, self.task))
        return stats

    def item_stats(self, index: int, answer: str) -> torch.Tensor:
        """Metric statistics of one item's answer, computed once per distinct answer (most rows repeat the base's).

        Per-item statistics add up to those of any set of items (`metrics.statistics`), BLEU's counts included.
        """
        key = (index, answer)
        if key not in self.stats_cache:
            self.stats_cache[key] = torch.tensor(metrics.statistics(self.metric, [answer], [self.refs[index]]),
                                                 dtype=torch.float64)
        return self.stats_cache[key]

    def retrieval_stats(self, chunk: _Chunk, margins: torch.Tensor) -> list[float]:
        """NDCG statistics of a chunk's items from one margin per candidate row."""
        per_item = [[] for _ in chunk.items]
        for s, k in enumerate(chunk.sequences):
            per_item[k].append(float(margins[s]))
        return metrics.statistics(self.metric, per_item, [self.refs[i] for i in chunk.items])

    def mean_logprobs(self, chunk: _Chunk, hidden: torch.Tensor, sequences, *, logits: bool = False) -> torch.Tensor:
        """Mean log-probability of each row's gold answer tokens, as `VLM.token_logprobs` computes it.

        `hidden` is the final hidden states of the rows (or, with `logits`, logits at their last
        width + 1 positions); row r holds trace row `sequences[r]`.
        """
        labels = chunk.labels.index_select(0, torch.tensor(list(sequences), device=chunk.labels.device))
        n = int((chunk.labels != -100).sum(-1).max())
        values = hidden[:, :-1] if logits else self.vlm.unembed(hidden[:, -(n + 1):-1])
        targets = labels[:, -n:].to(values.device)
        mask = (targets != -100).float()
        logp = torch.log_softmax(values, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return ((logp * mask).sum(-1) / mask.sum(-1)).cpu()

    # ----- verify, then decode only where the answer changes ----------------------------------------
    def verify(self, chunk: _Chunk, layer: int) -> dict[tuple[int, int], str]:
        """Greedy answers (as `VLM.generate` returns them) of every (item in chunk, head of `layer`) row."""
        vlm, stops = self.vlm, self.vlm.stop_ids
        width = max(1, max(len(self.traced_tokens(chunk, k)) for k in range(len(chunk.items))))
        answers: dict[tuple[int, int], str] = {}
        tokens: dict[tuple[int, int], list[int]] = {}
        resume: list[tuple[int, int, list[int]]] = []        # rows to decode on: (item, head, prefix)
        alone: list[tuple[int, int, list[int]]] = []         # near ties: (item, head, teacher-forced tokens)
        for part, plans in self.row_batches(chunk, layer):
            logits = vlm.logits_from_layer(chunk.trace, layer, [k for k, _ in part], plans=plans, last=width)
            top = logits.topk(2, dim=-1)
            best, second = top.values[..., 0], top.values[..., 1]
            ties = tie_mask(best - second, best, self.near_tie)
            predicted = top.indices[..., 0].tolist()
            for r, (k, h) in enumerate(part):
                if k in chunk.untraced:
                    self.counts["untraced_rows"] += 1
                    alone.append((k, h, []))
                    continue
                base = chunk.base_tokens[k]
                offset = width - len(base)
                guess = predicted[r][offset:]
                j = next((p for p, (a, b) in enumerate(zip(guess, base)) if not self.same(a, b)), None)
                relied = len(base) if j is None else j + 1        # positions this row's answer rests on
                prefix = list(base) if j is None else base[:j] + [guess[j]]
                if bool(ties[r, offset:offset + relied].any()) or self.unsafe.intersection(prefix):
                    self.counts["near_tie" if bool(ties[r, offset:offset + relied].any()) else "untraced_rows"] += 1
                    alone.append((k, h, prefix))
                elif j is None:
                    self.counts["verified"] += 1
                    tokens[(k, h)] = prefix
                else:
                    self.counts["departed"] += 1
                    self.departures[j] = self.departures.get(j, 0) + 1
                    if prefix[-1] in stops or len(prefix) >= MAX_NEW_TOKENS:
                        tokens[(k, h)] = prefix
                    else:
                        resume.append((k, h, prefix))
        self.decode_on(chunk, layer, resume, tokens, alone)
        for k, h, guess in alone:
            row = self.decode_alone(chunk.items[k], Plan.ablate_heads([(layer, h)]))
            if not all(self.same(a, b) for a, b in zip(row.tokens, guess)) or len(row.tokens) < len(guess):
                self.counts["disagreed"] += 1
            tokens[(k, h)] = row.tokens
        for key, ids in tokens.items():
            answers[key] = vlm.decode_answer(ids)
        return answers

    def decode_on(self, chunk: _Chunk, layer: int, resume: list, tokens: dict, alone: list) -> None:
        """Greedy decoding of departed rows from prompt + their verified prefix (batched, under each row's plan).

        The prefix's KV cache is not carried over from the teacher-forced pass: the rows are
        re-run from the prompt and prefix (prefill once, shared by rows of one item up to the
        ablated layer), then decoded step by step. A row whose continuation passes a near tie is
        decoded again from the prompt alone (`decode_alone`).
        """
        vlm = self.vlm
        for start in range(0, len(resume), self.batch_size):
            part = resume[start:start + self.batch_size]
            if vlm.arch.batch_first_inputs:
                inputs = vlm.extend_inputs(chunk.encoded, [p for _, _, p in part], rows=[k for k, _, _ in part])
            else:
                encoded = vlm.encode([self.image(chunk.items[k]) for k, _, _ in part],
                                     [self.items[chunk.items[k]].prompt for k, _, _ in part]).inputs
                inputs = vlm.extend_inputs(encoded, [p for _, _, p in part])
            budget = MAX_NEW_TOKENS - min(len(p) for _, _, p in part)
            plans = [Plan.ablate_heads([(layer, h)]) for _, h, _ in part]
            rows = vlm.greedy(inputs, max_new_tokens=budget, plans=plans)
            for (k, h, prefix), row in zip(part, rows):
                n = MAX_NEW_TOKENS - len(prefix)
                if tie_mask(torch.tensor(row.gaps[:n]), torch.tensor(row.best[:n]), self.near_tie).any():
                    self.counts["near_tie"] += 1
                    alone.append((k, h, prefix + row.tokens[:n]))
                    continue
                self.counts["decoded"] += 1
                tokens[(k, h)] = prefix + row.tokens[:n]

    def decode_alone(self, index: int, plan: Plan | None) -> Greedy:
        """The reference's own computation for one row: the item alone, greedy from its prompt."""
        item = self.items[index]
        return self.vlm.greedy(self.vlm.encode([self.image(index)], [item.prompt]).inputs,
                               max_new_tokens=MAX_NEW_TOKENS, plans=plan)[0]


def score_heads_reference(vlm: VLM, items: Sequence[TaskItem], *, utility: str = "metric",
                          progress: bool = True) -> HeadScores:
    """The straightforward algorithm: one head at a time, one item at a time (for benchmarks)."""
    _check_utility(utility)
    arch = vlm.arch

    def one_by_one(plan: Plan | None) -> float:
        if utility == "logprob":
            values = torch.cat([gold_logprob(vlm, [item], plans=plan, batch_size=1) for item in items])
            return float(values.mean())
        predictions = [predict(vlm, [item], plans=plan, batch_size=1)[0] for item in items]
        return float(metrics.aggregate(TASKS[items[0].task].metric, predictions, references(items)))

    base = one_by_one(None)
    scores = torch.zeros(arch.num_layers, arch.num_heads)
    heads = [(l, h) for l in range(arch.num_layers) for h in range(arch.num_heads)]
    for layer, head in tqdm(heads, desc="heads (reference)", disable=not progress):
        scores[layer, head] = base - one_by_one(Plan.ablate_heads([(layer, head)]))
    return HeadScores(scores, base, utility)
