"""README figures from a stored evaluation: budget curves per task and the cross-ablation matrices.

    python -m benchmarks.figures --rankings assets/rankings/toy-vlm --out docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hones_core import plots, rankings
from hones_core.metrics import METRICS
from hones_core.tasks import TASKS


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__.splitlines()[0])
    p.add_argument("--rankings", required=True, help="an artifact with evaluation.json (mask-eval --into-rankings)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--cross-method", default="hones", help="the method whose cross-ablation matrix is drawn")
    args = p.parse_args(argv)
    evaluation = rankings.load(args.rankings).evaluation
    if not evaluation or "drops" not in evaluation:
        raise SystemExit(f"{args.rankings} has no stored evaluation: run `python -m hones_core mask-eval ... "
                         f"--budgets 0.5,1,2,5 --cross --into-rankings` first")
    out = Path(args.out)
    written = {}
    for task, by_method in evaluation["drops"].items():
        curves = {m: {float(b): d["rel_drop"] for b, d in by_budget.items()} for m, by_budget in by_method.items()}
        plot = plots.budget_curve(curves, task=task, metric_name=METRICS[TASKS[task].metric].title)
        written[str(plots.save(plot, out / f"budget-{task}.png"))] = plot.caption
    cross = evaluation.get("cross", {}).get(args.cross_method)
    if cross:
        plot = plots.cross_ablation_matrix(cross["tasks"], cross["matrix"], method=args.cross_method,
                                           specificity=cross["specificity"])
        written[str(plots.save(plot, out / f"cross-{args.cross_method}.png"))] = plot.caption
    print(json.dumps({"figures": written}))
    return written


if __name__ == "__main__":
    main()
