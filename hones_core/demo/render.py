"""What the app shows for a computed request: the summary, the retrieval table, the figures, the results JSON.

Pure functions of the request, the computed plain data, and the selections and rankings they
are given. Figures are drawn with PIL by `charts` (milliseconds each; matplotlib took 0.1-0.25 s
per figure, most of a request); those that depend only on task, neuron set and budget (head
scores, layer spread, cross-task overlap) are drawn once and kept in the caller's figure cache,
so a request draws only its own input's two figures.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import metrics
from ..rankings import TaskRanking
from ..selection import Selection, jaccard_matrix, layer_sums, size
from ..tasks import TASKS
from . import charts
from .compute import SWEEP_FACTORS, BaseResult, Cache, Computed, SteeredResult
from .request import Request

PLOTS = ("heads", "layers", "contributions", "layer_sums", "overlap", "sweep")
TASK_TITLES = {name: task.title for name, task in TASKS.items()}
METHOD_LABELS = {"hones": "HONES", "activation": "activation magnitude (baseline)",
                 "dvp": "DVP without head conditioning (baseline)", "random": "random (same per-layer counts)",
                 "ap": "activation probability AP (paper baseline)", "ma": "mean activation MA (paper baseline)",
                 "ape": "activation-probability entropy APE (paper baseline)", "learned": "learned scales"}
TOP_NEURONS_SHOWN = 12


@dataclass
class Output:
    """Everything the app shows for one request."""
    base_answer: list[tuple[str, str | None]]
    steered_answer: list[tuple[str, str | None]]
    summary: str
    table: list[list] | None
    plots: dict[str, tuple[Image.Image, str]]   # PLOTS key -> (image, one-line caption)
    results: dict
    warnings: list[str]


@dataclass
class Neurons:
    """The neuron sets a request is shown with.

    Attributes:
        selection: the request's own neurons (its task, neuron set and budget).
        by_task: every task's neurons under `method` at the same budget (for the layer and
            overlap plots), where `method` is the request's set if every task has it, else "hones".
        method: the neuron set `by_task` was taken with.
        total: all (layer, neuron) pairs of the model.
        shortfall: neurons the budget asks for that the selection lacks because fewer neurons
            than that have a positive HONES importance (`TaskRanking.shortfall`).
    """
    selection: Selection
    by_task: dict[str, Selection]
    method: str
    total: int
    shortfall: int = 0


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, f"{method} (baseline)")


def diff_words(base: str, steered: str) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """Word-level diff for `gr.HighlightedText`: words only in base are "removed", only in steered "added"."""
    a, b = base.split(), steered.split()
    left: list[tuple[str, str | None]] = []
    right: list[tuple[str, str | None]] = []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            left.append((" ".join(a[i0:i1]) + " ", None))
            right.append((" ".join(b[j0:j1]) + " ", None))
            continue
        if i1 > i0:
            left.append((" ".join(a[i0:i1]) + " ", "removed"))
        if j1 > j0:
            right.append((" ".join(b[j0:j1]) + " ", "added"))
    return left or [("(empty answer)", "removed" if b else None)], right or [("(empty answer)",
                                                                             "added" if a else None)]


def format_pct(value: float) -> str:
    """A percentage for people: 100, 12.5, 1, 0.25, 0.0031 (no exponent notation)."""
    if value >= 10:
        return f"{value:.1f}".removesuffix(".0")
    if value >= 0.01:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def ranks(scores: Sequence[float]) -> list[int]:
    """1 = highest score; ties share the better rank's order of appearance."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out = [0] * len(scores)
    for rank, i in enumerate(order, 1):
        out[i] = rank
    return out


def cached_figure(cache: Cache, key: tuple, make: Callable[[], charts.Chart]) -> tuple[Image.Image, str]:
    """(image, caption) of a figure that depends only on `key`, drawn once."""
    cached = cache.get(key)
    if cached is None:
        cached = make().pair
        cache.put(key, cached)
    return cached


def shown_answers(request: Request, computed: Computed) -> tuple[str, str]:
    """The base and steered answer as text (retrieval: the top candidate of each)."""
    base, steered = computed.base, computed.steered
    if TASKS[request.task].scoring == "yes/no":
        return (request.candidates[int(np.argmax(base.margins))],
                request.candidates[int(np.argmax(steered.margins))])
    return base.answers[0], steered.answers[0]


def candidates_table(request: Request, base: BaseResult, steered: SteeredResult) -> list[list]:
    """Retrieval: one row per candidate, in base-rank order (ranks, caption, margins, Δ)."""
    base_rank, steered_rank = ranks(base.margins), ranks(steered.margins)
    order = sorted(range(len(request.candidates)), key=lambda i: base_rank[i])
    return [[base_rank[i], steered_rank[i],
             request.candidates[i] + (" ✓" if request.candidates[i] == request.gold else ""),
             round(base.margins[i], 3), round(steered.margins[i], 3), round(steered.margins[i] - base.margins[i], 3)]
            for i in order]


def metric_line(request: Request, base: BaseResult, steered: SteeredResult) -> str:
    """The task metric of both answers against the gold answer (and the gold log-prob change); "" without gold."""
    if request.gold is None:
        return ""
    metric = metrics.METRICS[TASKS[request.task].metric]
    if TASKS[request.task].scoring == "yes/no":
        positive = request.candidates.index(request.gold)
        b = metrics.aggregate(metric.name, [base.margins], [positive])
        s = metrics.aggregate(metric.name, [steered.margins], [positive])
        return f"{metric.title} of the gold caption: base **{b:.3f}** → steered **{s:.3f}** (Δ {s - b:+.3f})."
    b = metrics.aggregate(metric.name, base.answers[:1], [[request.gold]])
    s = metrics.aggregate(metric.name, steered.answers[:1], [[request.gold]])
    name = ("sentence " if metric.item_score is None else "") + metric.title    # corpus BLEU of one sentence
    text = f"{name} against the gold answer: base **{b:.3f}** → steered **{s:.3f}**."
    if base.gold_logprob is not None and steered.gold_logprob is not None:
        text += (f" Gold answer log-prob (mean per token): base **{base.gold_logprob:.3f}** → steered "
                 f"**{steered.gold_logprob:.3f}** (Δ {steered.gold_logprob - base.gold_logprob:+.3f}).")
    return text


def summary(request: Request, computed: Computed, neurons: Neurons, answers: tuple[str, str]) -> str:
    """The Markdown lines above the answers: the neuron set, the metric, whether answers differ, the time."""
    selection, total = neurons.selection, neurons.total
    n_selected = size(selection)
    learned = request.method == "learned"
    lines = [f"**{METHOD_LABELS.get(request.method, request.method)}**: {n_selected:,} neurons "
             f"({format_pct(100 * n_selected / total)} % of {total:,}) in layers "
             f"{', '.join(str(l) for l in selection) or '—'}, scaled ×{request.factor:g}"
             + (" on top of the learned scales (1 + s)" if learned else "") + "."]
    if learned:
        lines[0] += " (The budget does not apply to learned scales.)"
    elif neurons.shortfall:
        lines[0] += (f" Only {n_selected:,} neurons have a positive HONES importance, so the budget's other "
                     f"{neurons.shortfall:,} are not selected (no zeros are used to fill it).")
    metric = metric_line(request, computed.base, computed.steered)
    if metric:
        lines.append(metric)
    lines.append("Answers " + ("are identical." if answers[0] == answers[1] else "differ: words only in the "
                               "base answer are marked red, words only in the steered answer green."))
    lines.append(f"Computed in {computed.seconds:.2f} s"
                 + (" (base answer from the cache: only the steered row ran)." if computed.base_cached else
                    " (base and steered rows in one batch)."))
    return "\n\n".join(lines)


def figures(request: Request, computed: Computed, ranking: TaskRanking, neurons: Neurons, *, num_layers: int,
            cache: Cache) -> dict[str, tuple[Image.Image, str]]:
    """Every plot but the sweep: head scores, layer spread, this input's contributions, cross-task overlap."""
    task, budget_pct, used = request.task, request.budget_pct, neurons.method
    out = {"heads": cached_figure(cache, ("heads", task), lambda: charts.head_heatmap(
        ranking.head_scores, ranking.top_heads, task=task))}
    out["layers"] = cached_figure(cache, ("layers", used, budget_pct), lambda: charts.layer_distribution(
        neurons.by_task, num_layers))
    base, steered = computed.base, computed.steered
    if base.contributions is not None and steered.contributions is not None:
        out.update(input_figures(request, ranking, neurons.selection, base, steered))
    if len(neurons.by_task) >= 2:
        out["overlap"] = cached_figure(cache, ("overlap", used, budget_pct),
                                       lambda: charts.overlap_matrix(*jaccard_matrix(neurons.by_task)))
    return out


def shown_neurons(request: Request, ranking: TaskRanking, selection: Selection, base: BaseResult
                  ) -> list[tuple[int, int]]:
    """The (layer, neuron)s the top-contributions plot lists, in its order (the neuron card offers the same)."""
    if request.method in ("random", "learned"):     # no ranking order: the largest base contributions first
        pairs = [(int(l), int(n)) for l, ns in selection.items() for n in ns]
        pairs.sort(key=lambda p: -abs(float(base.contributions[p])))
    else:
        pairs = [(int(l), int(n)) for l, n, _ in ranking.ranked(request.method, request.budget_pct / 100)]
    return pairs[:TOP_NEURONS_SHOWN]


def neuron_label(layer: int, neuron: int) -> str:
    return f"L{layer}·n{neuron}"


def input_figures(request: Request, ranking: TaskRanking, selection: Selection, base: BaseResult,
                  steered: SteeredResult) -> dict[str, tuple[Image.Image, str]]:
    """This input's top contributions (base vs steered) and their per-layer sums."""
    pairs = shown_neurons(request, ranking, selection, base)
    labels = [neuron_label(l, n) for l, n in pairs]
    bar = charts.contributions(labels, [float(base.contributions[p]) for p in pairs],
                               [float(steered.contributions[p]) for p in pairs], title_hint=f"{base.target_label}")
    sums = charts.layer_sums(layer_sums(base.contributions, selection), layer_sums(steered.contributions, selection))
    return {"contributions": bar.pair, "layer_sums": sums.pair}


def results(request: Request, computed: Computed, neurons: Neurons, answers: tuple[str, str], *,
            sources: Mapping, wall: float) -> dict:
    """The downloadable results JSON: provenance, inputs, neurons, both answers, margins, log-probs, sums."""
    base, steered, selection = computed.base, computed.steered, neurons.selection
    return {
        "model": sources["model"], "rankings": sources["rankings"], "hones_core": sources["hones_core"],
        "task": request.task, "prompts": list(request.prompts), "candidates": list(request.candidates) or None,
        "gold": request.gold, "neuron_set": request.method, "budget_pct": request.budget_pct,
        "factor": request.factor, "selected_neurons": {str(l): v for l, v in selection.items()},
        "base": {"answer": answers[0], "margins": base.margins or None, "gold_logprob": base.gold_logprob},
        "steered": {"answer": answers[1], "margins": steered.margins or None, "gold_logprob": steered.gold_logprob},
        "contribution_target": base.target_label,
        "layer_sums": None if base.contributions is None else {
            "base": layer_sums(base.contributions, selection).tolist(),
            "steered": layer_sums(steered.contributions, selection).tolist()},
        "base_cached": computed.base_cached, "compute_s": round(computed.seconds, 4), "request_s": round(wall, 4),
    }


def render(request: Request, computed: Computed, ranking: TaskRanking, neurons: Neurons, *, num_layers: int,
           sources: Mapping, figure_cache: Cache, wall: float) -> Output:
    """Answers (word-diffed), summary, retrieval table, figures and results JSON of one computed request.

    Args:
        ranking: the request's task ranking (head scores, top heads, ranked neurons).
        neurons: the request's neurons and every task's at the same budget.
        sources: model / rankings / hones_core provenance for the results JSON.
        figure_cache: where input-independent figures are kept.
        wall: seconds the whole request took so far.
    """
    answers = shown_answers(request, computed)
    left, right = diff_words(*answers)
    table = (candidates_table(request, computed.base, computed.steered)
             if TASKS[request.task].scoring == "yes/no" else None)
    notes = list(request.notes)
    if sources["rankings"].get("other_model"):
        notes.append(f"Allowed with --allow-other-model: {sources['rankings']['other_model']}.")
    if computed.base.contributions is None:
        notes.append("The base answer is empty, so there is no answer direction for the contribution plots.")
    return Output(left, right, summary(request, computed, neurons, answers), table,
                  figures(request, computed, ranking, neurons, num_layers=num_layers, cache=figure_cache),
                  results(request, computed, neurons, answers, sources=sources, wall=wall), notes)


def sweep_figure(request: Request, values: Sequence[float]) -> tuple[Image.Image, str]:
    """The strength-sweep plot of `compute_sweep`'s values, the request's factor marked."""
    if TASKS[request.task].scoring == "yes/no":
        ylabel = f"Yes−No margin of {'the gold caption' if request.gold else 'the top base candidate'}"
    else:
        ylabel = f"{'gold' if request.gold else 'base'} answer log-prob (mean per token)"
    return charts.strength_sweep(list(SWEEP_FACTORS), list(values), current=request.factor, ylabel=ylabel).pair


def write_results(results: dict, folder: str | Path) -> Path:
    """The results JSON as a file for download (unique name in `folder`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(results, indent=1, ensure_ascii=False)
    path = folder / f"hones-results-{hashlib.sha1(body.encode()).hexdigest()[:12]}.json"
    path.write_text(body + "\n", encoding="utf-8")
    return path
