"""The dataset card (README.md) of a rankings artifact, and the figures an existing card links to.

`dataset_card` writes the text; `linked_figures` reads the figure lines back, so that rewriting
the card of a folder (`save_task`, `save_scales`) keeps the figures `push` drew for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .schema import CARD_FILE, DEFAULT_RATIO, SCHEMA, STATS_FILE, Rankings

# One figure per line, as `dataset_card` writes them: ![caption](path)
_FIGURE_LINE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<path>[^)]+)\)\s*$", re.MULTILINE)


def linked_figures(directory: str | Path) -> dict[str, str]:
    """The figures an existing card links to, so rewriting the card keeps them.

    Args:
        directory: the artifact folder.

    Returns:
        {PNG path relative to the folder: caption}, in card order; empty without a card.
    """
    card = Path(directory) / CARD_FILE
    if not card.exists():
        return {}
    return {m["path"]: m["caption"] for m in _FIGURE_LINE.finditer(card.read_text(encoding="utf-8"))}


def _format_value(value: Any) -> str:
    return f"`{json.dumps(value)}`" if isinstance(value, (dict, list)) else f"`{value}`"


def dataset_card(rankings: Rankings, figures: Mapping[str, str] | None = None) -> str:
    """The README.md of a rankings dataset repo: YAML front matter, then model, tasks, params, data, figures.

    Args:
        rankings: the artifact.
        figures: {PNG path relative to the artifact folder: caption}.

    Returns:
        The card's text (Markdown, ending in a newline).
    """
    model = rankings.model
    # JSON strings are valid YAML scalars, so ids with ':' or quotes stay safe.
    front = "\n".join([
        "---",
        "license: mit",
        f"pretty_name: {json.dumps(f'HONES rankings for {model.id}')}",
        "tags:",
        "- hones",
        "- interpretability",
        "- vision-language",
        "---",
    ])
    lines = [
        front, "",
        f"# HONES rankings for {model.id}", "",
        "Critical attention heads and head-conditioned FFN neuron rankings computed with "
        "[HONES](https://github.com/petergit1/HONES) (*From Heads to Neurons: Causal Attribution and Steering "
        "in Multi-Task Vision-Language Models*), "
        f"stored as schema `{SCHEMA}` by {rankings.created_with}.", "",
        "## Model", "",
        f"- id: `{model.id}`",
        f"- revision: `{model.revision or 'unpinned'}`",
        f"- family: `{model.family}`",
        f"- shapes: {model.num_layers} layers x {model.num_heads} heads; "
        f"{model.num_layers} layers x {model.intermediate_size} FFN neurons", "",
        "## Tasks", "",
        "| task | top heads (layer.head) | neurons at 1 % | baselines | learned scales | fallback |",
        "|---|---|---|---|---|---|",
    ]
    for name, ranking in rankings.tasks.items():
        heads = ", ".join(f"{layer}.{head}" for layer, head in ranking.top_heads[:10])
        if len(ranking.top_heads) > 10:
            heads += f", … ({len(ranking.top_heads)} in all)"
        count = sum(len(v) for v in ranking.select("hones", DEFAULT_RATIO).values())
        scales = f"{len(ranking.scales)} neurons" if ranking.scales is not None else "—"
        fallback = "yes: unconditioned DVP" if ranking.fallback else "no"
        lines.append(f"| {name} | {heads or '—'} | {count} | {', '.join(ranking.baselines) or '—'} | {scales} "
                     f"| {fallback} |")
    lines += ["", stats_line(rankings)]
    notes = [(name, r.notes) for name, r in rankings.tasks.items() if r.notes]
    if notes:
        lines += ["", *[f"- **{name}**: {text}" for name, text in notes]]
    for title, values in (("Parameters", rankings.params), ("Data", rankings.data)):
        lines += ["", f"## {title}", ""]
        lines += [f"- {key}: {_format_value(value)}" for key, value in values.items()] or ["- (none recorded)"]
    lines += evaluation_lines(rankings.evaluation)
    lines += ["", "## Use", "", "```python",
              "from hones_core import rankings",
              "artifact = rankings.load(\"<this repo id>\")   # or a local folder",
              "neurons = artifact.task(\"vqa\").select(\"hones\", 0.01)   # {layer: [neuron, ...]}",
              "```"]
    if figures:
        lines += ["", "## Figures", ""]
        for png, caption in figures.items():
            lines += [f"![{caption}]({png})", ""]
    return "\n".join(lines).rstrip() + "\n"


def stats_line(rankings: Rankings) -> str:
    """The card's line on per-neuron discovery statistics: which tasks store them, or how to add them."""
    have = {name: r.stats.items for name, r in rankings.tasks.items() if r.stats is not None}
    how = ("`python -m hones_core stats --model <model> --rankings <this folder> --data <the discovery split>` "
           "adds them without re-ranking")
    if not have:
        return f"Per-neuron discovery statistics (`<task>/{STATS_FILE}`): none stored; {how}."
    listed = ", ".join(f"{name} ({n} items)" for name, n in have.items())
    missing = [name for name in rankings.tasks if name not in have]
    text = (f"Per-neuron discovery statistics (`<task>/{STATS_FILE}`: mean, std, mean |z| and P(z > 0) of each "
            f"neuron's activation at the last prompt position): {listed}.")
    return text + (f" Missing for {', '.join(missing)}: {how}." if missing else "")


def evaluation_lines(evaluation: Mapping | None) -> list[str]:
    """The card's "Stored evaluation" section: relative drops at one budget, and specificity per method."""
    if not evaluation or not evaluation.get("drops"):
        return []
    budgets = [f"{b:g}" for b in evaluation.get("budgets_pct", [])]
    shown = "1" if "1" in budgets else (budgets[0] if budgets else None)
    drops = evaluation["drops"]
    methods = list(evaluation.get("methods") or next(iter(drops.values())))
    split = evaluation.get("split", {})
    lines = ["", "## Stored evaluation", "",
             f"Relative drop (%) of each task's metric when each method's top {shown} % of neurons are masked, "
             f"on the held-out split `{split.get('file', '?')}` ({_format_value(split.get('items', {}))} items; "
             f"`python -m hones_core mask-eval ... --into-rankings`).", "",
             "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task, by_method in drops.items():
        cells = [by_method.get(m, {}).get(shown) for m in methods]
        lines.append(f"| {task} | " + " | ".join("—" if c is None else f"{c['rel_drop']:.1f}" for c in cells) + " |")
    cross = evaluation.get("cross") or {}
    if cross:
        lines += ["", "Specificity (diagonal minus off-diagonal mean of the cross-ablation matrix, points): "
                  + ", ".join(f"{m} {c['specificity']:.1f}" for m, c in cross.items()
                              if c.get("specificity") is not None) + "."]
    return lines


__all__ = ["dataset_card", "linked_figures", "stats_line", "evaluation_lines"]
