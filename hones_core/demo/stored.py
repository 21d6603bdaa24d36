"""The artifact's stored evaluation, as the app shows it: budget curve, cross-ablation, one line.

`mask-eval --into-rankings` stores, per task and method, the metric drop at each budget and
(since the change counts were added) how many held-out items changed their answer. This is
what tells a visitor whether an unchanged answer on one input is the method or the example:
`evidence_line` says, for the neuron set and budget the request uses, how many held-out answers
masking changed and how many the same number of random neurons changed.

Everything here depends only on the artifact, the task, the method and the budget, so the
service draws each figure once and caches it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image

from .. import plots
from ..masking import budget_key
from ..metrics import METRICS
from ..tasks import TASKS
from .render import method_label


@dataclass(frozen=True)
class StoredEvaluation:
    """What one task's stored evaluation says.

    Attributes:
        task: the task.
        items: held-out items the stored numbers come from.
        split: the split's file name as recorded.
        budgets: stored budgets in percent, ascending.
        drops: `{method: {budget %: drop dict (base, masked, abs_drop, rel_drop, neurons[, changed, items])}}`.
        cross: `{"tasks", "matrix", "specificity"}` for HONES, or None.
    """
    task: str
    items: int
    split: str
    budgets: tuple[float, ...]
    drops: Mapping[str, Mapping[float, Mapping]]
    cross: Mapping | None


def stored(evaluation: Mapping | None, task: str) -> StoredEvaluation | None:
    """The stored evaluation of `task`, or None when the artifact stores none for it."""
    if not evaluation or task not in (evaluation.get("drops") or {}):
        return None
    drops = {method: {float(b): d for b, d in by_budget.items()}
             for method, by_budget in evaluation["drops"][task].items()}
    split = evaluation.get("split") or {}
    cross = (evaluation.get("cross") or {}).get("hones")
    return StoredEvaluation(task=task, items=int((split.get("items") or {}).get(task, 0)),
                            split=str(split.get("file", "a held-out split")),
                            budgets=tuple(sorted({b for curve in drops.values() for b in curve})), drops=drops,
                            cross=cross if cross and task in cross.get("tasks", []) else None)


def _method(method: str) -> str:
    return method_label(method)


def evidence_line(view: StoredEvaluation | None, method: str, budget_pct: float) -> str:
    """One line: on N held-out items masking this set changed X answers; random neurons changed Y.

    Falls back to the metric drops where the stored evaluation has no change counts (artifacts
    from before they were recorded), and says so where the budget or method was not evaluated.
    """
    if view is None:
        return ("_No stored evaluation in these rankings: run `python -m hones_core mask-eval ... --budgets 0.5,1,2,5 "
                "--cross --into-rankings` to show how often masking changes held-out answers._")
    stored_budgets = ", ".join(f"{b:g} %" for b in view.budgets)
    if method not in view.drops:
        return (f"_The stored evaluation has no results for {_method(method)}; it covers "
                f"{', '.join(_method(m) for m in view.drops)} at {stored_budgets}._")
    budget = float(budget_key(budget_pct))
    if budget not in view.drops[method]:
        return (f"_The stored evaluation covers budgets {stored_budgets}, not {budget_pct:g} %: "
                f"pick one of those to compare this answer with held-out ones._")
    mine = view.drops[method][budget]
    random = (view.drops.get("random") or {}).get(budget)
    metric = METRICS[TASKS[view.task].metric].title
    where = f"On {mine.get('items', view.items)} held-out items ({view.split})"
    if "changed" in mine:
        line = (f"**{where}, masking these {mine['neurons']} neurons ({_method(method)}, {budget:g} %) changed "
                f"{mine['changed']} answers**")
        if random is not None and method != "random" and "changed" in random:
            line += f"; the same number of random neurons changed {random['changed']}"
        return line + f" ({metric} drop {mine['rel_drop']:.1f} % vs {_random_drop(random)})."
    return (f"**{where}, masking these {mine['neurons']} neurons ({_method(method)}, {budget:g} %) dropped {metric} "
            f"by {mine['rel_drop']:.1f} %**; random neurons: {_random_drop(random)} (this artifact stores no counts "
            f"of changed answers).")


def _random_drop(random: Mapping | None) -> str:
    return "no random baseline stored" if random is None else f"{random['rel_drop']:.1f} % for random"


def budget_figure(view: StoredEvaluation) -> plots.Plot:
    """Relative drop against budget, one line per stored method."""
    curves = {m: {b: d["rel_drop"] for b, d in by_budget.items()} for m, by_budget in view.drops.items()}
    return plots.budget_curve(curves, task=view.task, metric_name=METRICS[TASKS[view.task].metric].title)


def cross_figure(view: StoredEvaluation) -> plots.Plot | None:
    """The HONES cross-ablation matrix (row task's set masked, drop on column task), or None."""
    if view.cross is None:
        return None
    return plots.cross_ablation_matrix(view.cross["tasks"], view.cross["matrix"], method="hones",
                                       specificity=view.cross.get("specificity"))


def as_image(plot: plots.Plot, dpi: int = 90) -> tuple[Image.Image, str]:
    """(RGB image, caption) of a matplotlib figure (drawn once per task: see `DemoService.evidence_figures`)."""
    buffer = io.BytesIO()
    plot.figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB"), plot.caption


__all__ = ["StoredEvaluation", "stored", "evidence_line", "budget_figure", "cross_figure", "as_image"]
