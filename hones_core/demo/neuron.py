"""The neuron card: what one FFN neuron (layer l, neuron i) writes, how it fires here, where it ranks.

For any (layer, neuron) of the model and one request:

- **vocabulary**: the tokens its write-in promotes and suppresses most, the top and bottom `k`
  of W_U · W_down[:, i] (the direct-path logit change per unit of z, before the final norm, as
  DVP reads it; computed with `attribution.readout`, the method's own readout, with W_U's rows
  as directions);
- **activation**: z = act(gate(x)) · up(x) of the neuron at the **last prompt position** of
  this input (the position whose output predicts the first answer token, where DVP measures the
  write-in contribution), on the base row, against the same neuron's discovery statistics of
  the request's task (`NeuronStats`: mean, std over the discovery items at that position);
- **ranks**: its 1-based rank among all layers x intermediate neurons in every task's HONES
  ranking and each baseline stored (`TaskRanking.rank_of`: higher score first, ties by the lower
  flat index, so rank <= budget means "selected", for HONES when the importance is also > 0);
- **masking it alone**: one batched forward with three rows, all teacher-forced on the base
  answer — base (no plan), steered (the request's plan), base with this neuron masked (z_i = 0
  at every position) — giving the answer's log-prob under each and Δ = masked − base.

The teacher-forced answer: for generation tasks the base answer (as shown); for retrieval the
shown candidate (`BaseResult.row`) answered "Yes" if its base Yes−No margin is > 0, else "No".
Log-probs are summed over the answer's tokens (no end-of-turn token), and also given per token.

`neuron_card` returns plain data (`NeuronCard`, picklable for ZeroGPU); `card_markdown` renders it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import attribution, plots
from ..errors import DemoInputError
from ..interventions import Plan, intervene
from ..models import VLM
from ..rankings import Rankings
from ..selection import budget
from ..sharing import share_images
from ..tasks import TASKS
from .compute import BaseResult
from .request import Request

VOCAB_TOP = 10
VOCAB_CHUNK = 16384      # rows of W_U multiplied at a time: a float32 copy of a 150k-token W_U would be GBs
STATS_HINT = ("add them without re-ranking: `python -m hones_core stats --model <model> --rankings <artifact folder> "
              "--data <the discovery split it was ranked on>`")


@dataclass
class TokenValue:
    """A vocabulary token and its write-in logit effect W_U[t] · W_down[:, i]."""
    token_id: int
    text: str
    value: float


@dataclass
class NeuronCard:
    """Everything the card shows, plain data.

    Attributes:
        layer, neuron: the neuron.
        task: the request's task.
        promoted, suppressed: top / bottom tokens of W_U · W_down[:, i], largest magnitude first.
        activation: z on this input (base row, last prompt position).
        stats: the request task's discovery statistics of this neuron ({"mean", "std", "mean_abs",
            "positive"}), or None when the artifact stores none (`stats_note` says how to add them).
        stats_items: how many discovery items the statistics are over (0 without statistics).
        stats_by_task: the discovery mean z of every task that stores statistics.
        ranks: task -> method -> 1-based rank among `total` neurons ("random" has no ranks).
        selected: task -> method -> whether the method's selection at the request's budget holds it.
        learned_scale: task -> the learned scale s of this neuron, for tasks whose scales include it.
        answer: the teacher-forced answer; answer_tokens: how many tokens it has.
        logprob: "base", "steered", "masked" -> log p(answer) summed over its tokens.
        delta: logprob["masked"] - logprob["base"]; delta_per_token: the same divided by answer_tokens.
    """
    layer: int
    neuron: int
    task: str
    total: int
    budget_pct: float
    promoted: list[TokenValue]
    suppressed: list[TokenValue]
    activation: float
    stats: dict[str, float] | None
    stats_items: int
    stats_by_task: dict[str, float]
    stats_note: str
    ranks: dict[str, dict[str, int]]
    selected: dict[str, dict[str, bool]]
    learned_scale: dict[str, float]
    answer: str
    answer_tokens: int
    logprob: dict[str, float]
    delta: float
    delta_per_token: float
    notes: list[str] = field(default_factory=list)

    @property
    def z_score(self) -> float | None:
        """(activation − discovery mean) / discovery std; None without statistics or with std 0."""
        if self.stats is None or self.stats["std"] <= 0:
            return None
        return (self.activation - self.stats["mean"]) / self.stats["std"]


def check_neuron(vlm: VLM, layer, neuron) -> tuple[int, int]:
    """(layer, neuron) as ints inside the model.

    Raises:
        DemoInputError: not integers, or outside the model's layers x intermediate neurons.
    """
    L, I = vlm.arch.num_layers, vlm.arch.intermediate_size
    try:
        if isinstance(layer, bool) or isinstance(neuron, bool) or float(layer) != int(layer) \
                or float(neuron) != int(neuron):
            raise ValueError
        layer, neuron = int(layer), int(neuron)
    except (TypeError, ValueError, OverflowError):
        raise DemoInputError(f"A neuron is given by two whole numbers, its layer and its index; got layer "
                             f"{layer!r}, neuron {neuron!r}.") from None
    if not 0 <= layer < L:
        raise DemoInputError(f"Layer {layer} does not exist: this model has {L} layers (0 … {L - 1}).")
    if not 0 <= neuron < I:
        raise DemoInputError(f"Neuron {neuron} does not exist: each layer has {I} FFN neurons (0 … {I - 1}).")
    return layer, neuron


def token_text(vlm: VLM, token_id: int) -> str:
    """How a vocabulary entry reads (decoded; `<id N>` for ids the tokenizer cannot decode to text)."""
    if token_id >= len(vlm.tokenizer):
        return f"<id {token_id}>"
    text = vlm.tokenizer.decode([token_id])
    return text if text else f"<id {token_id}>"


@torch.inference_mode()
def vocab_projection(vlm: VLM, layer: int, neuron: int) -> torch.Tensor:
    """W_U · W_down[:, i]: the neuron's direct logit effect per unit z on every token, `[vocab]` float32 (CPU)."""
    unembedding = vlm.arch.unembedding().detach()                           # [vocab, hidden]
    column = vlm.arch.layers[layer].down_proj.weight[:, neuron:neuron + 1]  # [hidden, 1]
    parts = [attribution.readout(column, unembedding[start:start + VOCAB_CHUNK])[:, 0].cpu()
             for start in range(0, unembedding.shape[0], VOCAB_CHUNK)]
    return torch.cat(parts)


def vocab_extremes(vlm: VLM, layer: int, neuron: int, k: int = VOCAB_TOP) -> tuple[list[TokenValue], list[TokenValue]]:
    """The `k` tokens the neuron's write-in promotes most and the `k` it suppresses most.

    Ties are broken by the lower token id (a stable sort).
    """
    values = vocab_projection(vlm, layer, neuron)
    k = min(k, values.numel())
    up = torch.sort(values, descending=True, stable=True).indices[:k].tolist()
    down = torch.sort(values, stable=True).indices[:k].tolist()
    return ([TokenValue(t, token_text(vlm, t), float(values[t])) for t in up],
            [TokenValue(t, token_text(vlm, t), float(values[t])) for t in down])


def ranks(artifact: Rankings, layer: int, neuron: int, budget_pct: float
          ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, bool]]]:
    """Rank of the neuron under every task's methods with scores, and whether each selects it at `budget_pct`."""
    by_task, chosen = {}, {}
    for name, ranking in artifact.tasks.items():
        total = ranking.importance.numel()
        k = budget(budget_pct / 100, total)
        by_task[name], chosen[name] = {}, {}
        for method in ranking.methods():
            if method == "random":
                continue
            rank = ranking.rank_of(method, layer, neuron)
            by_task[name][method] = rank
            positive = not ranking.positive_only(method) or float(ranking.matrix(method)[layer, neuron]) > 0
            chosen[name][method] = rank <= k and positive
    return by_task, chosen


def teacher_forced(request: Request, base: BaseResult) -> tuple[str, str]:
    """(prompt, answer) the card teacher-forces: the base answer, or retrieval's "Yes"/"No" on the shown row.

    Raises:
        DemoInputError: the base answer is empty (nothing to score).
    """
    if TASKS[request.task].scoring == "yes/no":
        return request.prompts[base.row], ("Yes" if base.margins[base.row] > 0 else "No")
    answer = base.answers[0] if base.answers else ""
    if not answer.strip():
        raise DemoInputError("The base answer is empty, so there is no answer whose log-probability masking this "
                             "neuron could change.")
    return request.prompts[0], answer


@torch.inference_mode()
def masked_rows(vlm: VLM, request: Request, prompt: str, answer: str, steered: Plan, layer: int, neuron: int
                ) -> tuple[list[float], int, float]:
    """One forward of three rows teacher-forced on `answer`: base, steered, base with the neuron masked.

    Returns:
        (log p(answer) summed over its tokens per row, the number of answer tokens, z of the neuron at
        the base row's last prompt position).

    The rows share the vision tower (same image); the decoder runs all three rows, so the token
    mask that reads z selects the base row alone (a shared decoder prefix would count it once per row
    it stands for).
    """
    plans = [Plan(), steered, Plan.scale_neurons({layer: [neuron]}, 0.0)]
    encoded = vlm.encode([request.image] * 3, [prompt] * 3, [answer] * 3)
    ids = encoded.inputs["input_ids"]                                   # [3, seq], no padding: equal rows
    n = int((encoded.labels[0] != -100).sum())
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    mask[0, ids.shape[1] - n - 1] = True                                # the base row's last prompt token
    with intervene(vlm.arch, plans, token_mask=mask) as capture, share_images(vlm.arch):
        logp, valid = vlm.token_logprobs(encoded)
    z = float(capture.stats.total[layer][neuron])                       # Σ over the one selected position
    return (logp * valid).sum(-1).tolist(), n, z


def neuron_card(vlm: VLM, request: Request, artifact: Rankings, base: BaseResult, steered: Plan, *,
                layer, neuron, k: int = VOCAB_TOP) -> NeuronCard:
    """The card of (layer, neuron) for a request whose base result is `base` and steered plan `steered`.

    Args:
        artifact: the rankings (every task's ranks; the request task's discovery statistics).
        base: the request's base result (`DemoService.compute(...).base`), for the answer to score.
        steered: the steered row's plan (`DemoService.plan(request)`).
        layer, neuron: the neuron (checked against the model).
        k: how many promoted and suppressed tokens.

    Raises:
        DemoInputError: no such neuron, or an empty base answer.
    """
    layer, neuron = check_neuron(vlm, layer, neuron)
    promoted, suppressed = vocab_extremes(vlm, layer, neuron, k)
    prompt, answer = teacher_forced(request, base)
    (lp_base, lp_steered, lp_masked), n, z = masked_rows(vlm, request, prompt, answer, steered, layer, neuron)
    ranking = artifact.task(request.task)
    stats = ranking.stats.of(layer, neuron) if ranking.stats is not None else None
    note = "" if stats is not None else (f"The rankings store no discovery statistics for {request.task} "
                                         f"(<task>/stats.safetensors); {STATS_HINT}.")
    by_rank, chosen = ranks(artifact, layer, neuron, request.budget_pct)
    learned = {}
    for name, r in artifact.tasks.items():
        if r.scales is not None:
            hit = ((r.scales.layers == layer) & (r.scales.neurons == neuron)).nonzero()
            if len(hit):
                learned[name] = float(r.scales.scale[int(hit[0, 0])])
    notes = []
    if TASKS[request.task].scoring == "yes/no":
        notes.append(f"Retrieval: scored on candidate {base.row + 1} (the one the contribution plots show), "
                     f"teacher-forced on its base answer \"{answer}\".")
    return NeuronCard(
        layer=layer, neuron=neuron, task=request.task, total=vlm.arch.num_layers * vlm.arch.intermediate_size,
        budget_pct=request.budget_pct, promoted=promoted, suppressed=suppressed, activation=z, stats=stats,
        stats_items=ranking.stats.items if ranking.stats is not None else 0,
        stats_by_task={name: float(r.stats.mean[layer, neuron]) for name, r in artifact.tasks.items()
                       if r.stats is not None},
        stats_note=note, ranks=by_rank, selected=chosen, learned_scale=learned, answer=answer, answer_tokens=n,
        logprob={"base": lp_base, "steered": lp_steered, "masked": lp_masked}, delta=lp_masked - lp_base,
        delta_per_token=(lp_masked - lp_base) / n, notes=notes)


def number(value: float, *, sign: bool = False) -> str:
    """A log-prob or Δ for people: 4 significant digits, tiny values in exponent form (not "-0.0000")."""
    return f"{value:+.4g}" if sign else f"{value:.4g}"


def _cell(text: str) -> str:
    """A token's text safe inside a Markdown table cell (pipes, backticks and newlines shown)."""
    shown = repr(text)[1:-1]          # whitespace and control characters visible: '\n', ' ' stays ' '
    return "`" + shown.replace("`", "ˋ").replace("|", "\\|") + "`"


def card_markdown(card: NeuronCard, *, method_label=lambda m: m) -> str:
    """The card as Markdown: activation, masking effect, vocabulary table, ranks table.

    Args:
        method_label: how a method key is shown (e.g. `render.method_label`).
    """
    lines = [f"### Neuron L{card.layer}·n{card.neuron}"]
    if card.stats is not None:
        s = card.stats
        z = card.z_score
        where = f"{z:+.2f} σ from" if z is not None else "(std 0 over the discovery items) vs"
        lines.append(f"**Activation** on this input (z at the last prompt position, base row): "
                     f"**{card.activation:.4g}** — {where} its {card.task} discovery mean {s['mean']:.4g} (std {s['std']:.4g}, mean |z| "
                     f"{s['mean_abs']:.4g}, z > 0 on {100 * s['positive']:.0f} % of {card.stats_items} items).")
        others = {t: m for t, m in card.stats_by_task.items() if t != card.task}
        if others:
            lines.append("Discovery mean z on the other tasks: "
                         + ", ".join(f"{t} {m:.4g}" for t, m in others.items()) + ".")
    else:
        lines.append(f"**Activation** on this input (z at the last prompt position, base row): "
                     f"**{card.activation:.4g}**. {card.stats_note}")
    lines.append(f"**Masking it alone** (z = 0 at every position), teacher-forced on the answer \"{card.answer}\" "
                 f"({card.answer_tokens} token{'s' if card.answer_tokens != 1 else ''}): log-prob "
                 f"{number(card.logprob['base'])} → **{number(card.logprob['masked'])}** (Δ "
                 f"**{number(card.delta, sign=True)}**, {number(card.delta_per_token, sign=True)} per token); "
                 f"under the steered row {number(card.logprob['steered'])}.")
    lines += card.notes
    lines += ["", "| promotes | W_U·W_down | suppresses | W_U·W_down |", "|---|---:|---|---:|"]
    for up, down in zip(card.promoted, card.suppressed):
        lines.append(f"| {_cell(up.text)} | {up.value:+.4f} | {_cell(down.text)} | {down.value:+.4f} |")
    methods: list[str] = []
    for by_method in card.ranks.values():
        methods += [m for m in by_method if m not in methods]
    # one row per method, one column per task: method names are long, task names short
    tasks = list(card.ranks)
    lines += ["", f"Rank among all {card.total:,} neurons (1 = top; ties: lower layer·index first; **bold** = "
                  f"selected at the {card.budget_pct:g} % budget):", "",
              "| neuron set | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m in methods:
        cells = []
        for task in tasks:
            if m not in card.ranks[task]:
                cells.append("—")
            else:
                rank = f"{card.ranks[task][m]:,}"
                cells.append(f"**{rank}**" if card.selected[task][m] else rank)
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    scales = [card.learned_scale.get(task) for task in tasks]
    lines.append("| learned scale s | " + " | ".join("—" if v is None else f"{v:+.3f}" for v in scales) + " |")
    return "\n".join(lines) + "\n"


def card_dict(card: NeuronCard) -> dict:
    """The card as JSON-able data (for the results file or an API client)."""
    out = {key: value for key, value in card.__dict__.items() if key not in ("promoted", "suppressed")}
    out["promoted"] = [t.__dict__ for t in card.promoted]
    out["suppressed"] = [t.__dict__ for t in card.suppressed]
    out["z_score"] = card.z_score
    return out


def neurons_of(text: str) -> Sequence[int]:
    """`"L3·n120"`, `"3, 120"`, `"3 120"` or `"L3 n120"` -> (3, 120), for a neuron picked from a list or typed.

    Raises:
        DemoInputError: the text is not a layer and a neuron number.
    """
    numbers = re.findall(r"\d+", str(text or ""))
    if len(numbers) != 2:
        raise DemoInputError(f"Give a neuron as its layer and index, e.g. \"L2·n17\" or \"2, 17\"; got {text!r}.")
    return int(numbers[0]), int(numbers[1])


def card_figure(card: NeuronCard) -> plots.Plot:
    """The card's promoted / suppressed tokens as a bar figure (`plots.neuron_vocabulary`)."""
    return plots.neuron_vocabulary([(t.text, t.value) for t in card.promoted],
                                   [(t.text, t.value) for t in card.suppressed],
                                   neuron=f"L{card.layer}·n{card.neuron}")


__all__ = ["VOCAB_TOP", "TokenValue", "NeuronCard", "check_neuron", "token_text", "vocab_projection",
           "vocab_extremes", "ranks", "teacher_forced", "masked_rows", "neuron_card", "card_markdown", "card_dict",
           "neurons_of", "card_figure"]
