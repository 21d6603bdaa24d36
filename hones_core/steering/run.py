"""Running the steering methods for one task and keeping their results on disk.

`run_task` reports base and each chosen method (fixed / grid / learned / learned-nokl /
random, see the package docstring) on the test split and keeps `<out>/<task>/results.json`
up to date after each method, so rerunning the same command skips what is done; learned
training checkpoints to `<out>/.progress/` at every epoch boundary. `results_table` turns
the results of several tasks into a markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import rankings
from ..errors import ProgressMismatchError
from ..evaluation import evaluate
from ..files import atomic_write, digest
from ..interventions import Plan
from ..localization import utilities
from ..models import VLM
from ..rankings import ModelInfo, Scales, TaskRanking
from ..selection import Selection
from ..tasks import TASKS, TaskItem
from .learn import SteerConfig, learn_scales

__all__ = ["METHODS", "LEARNED", "GRID", "FIXED_FACTOR", "RESULTS_FILE",
           "grid_search", "scales_file", "TaskRun", "run_task", "results_table"]

METHODS = ("fixed", "grid", "learned", "learned-nokl", "random")
LEARNED = ("learned", "learned-nokl", "random")
GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
FIXED_FACTOR = 2.0
RESULTS_FILE = "results.json"


def _result(method: str, evaluation, settings: dict) -> dict:
    return {"method": method, "metric": evaluation.metric, "n": evaluation.n, "settings": settings}


def grid_search(vlm: VLM, dev_items: Sequence[TaskItem], selection: Selection, *, factors: Sequence[float] = GRID,
                batch_size: int = 16, progress: bool = True) -> tuple[float, dict[float, float]]:
    """The factor with the best dev metric and the dev metric of each factor.

    Ties go to the factor closest to 1 (the smallest change), then to the smaller factor
    (0.75 over 1.25: both change the activations by a quarter).
    """
    values = utilities(vlm, dev_items, [Plan.scale_neurons(selection, f) for f in factors], "metric",
                       batch_size=batch_size, progress=progress)
    by_factor = dict(zip(factors, values))
    best = max(factors, key=lambda f: (by_factor[f], -abs(f - 1.0), -f))
    return best, by_factor


def _scale_stats(scale: torch.Tensor, clamp: float) -> dict:
    return {"mean": float(scale.mean()), "min": float(scale.min()), "max": float(scale.max()),
            "abs_mean": float(scale.abs().mean()), "at_clamp": int((scale.abs() >= clamp).sum())}


def scales_file(method: str) -> str:
    """Where a learned method's scales go inside `<out>/<task>/`: the main method's in the artifact's name."""
    return rankings.SCALES_FILE if method == "learned" else f"scales-{method}.safetensors"


@dataclass(frozen=True)
class TaskRun:
    """What `run_task` returns: the results document and the learned methods' scales.

    Attributes:
        doc: the results document, as written to `<out>/<task>/results.json`.
        trained: {method: Scales} of the learned methods trained by this call (the values
            written to `<out>/<task>/`, not read back).
        out: the output folder the document's "scales_file" paths are relative to.
        model: the model the scales belong to (for checking a scales file when it is read).
    """
    doc: dict
    trained: dict[str, Scales]
    out: Path
    model: ModelInfo

    def scales(self, method: str = "learned") -> Scales | None:
        """A learned method's scales: trained by this call, else read from `<out>` (an earlier run trained
        them); None when the results have no such method.

        Raises:
            ValueError: `method` is not one of `LEARNED`.
            RankingsSchemaError: an earlier run's scales file is missing or malformed.
        """
        if method not in LEARNED:
            raise ValueError(f"{method!r} learns no scales; the learned methods are {', '.join(LEARNED)}")
        if method in self.trained:
            return self.trained[method]
        result = self.doc["results"].get(method)
        if result is None:
            return None
        return rankings.read_scales(self.out / result["settings"]["scales_file"], self.model)


def _checkpoint_file(out: Path, task: str, method: str) -> Path:
    return out / ".progress" / f"{task}-{method}.safetensors"


def _check_inputs(task: str, dev_items: Sequence[TaskItem], test_items: Sequence[TaskItem],
                  methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown steering method(s) {unknown}; methods are {', '.join(METHODS)}")
    for name, items in (("dev", dev_items), ("test", test_items)):
        if not items:
            raise ValueError(f"no {name} items for task {task!r}")
        if any(item.task != task for item in items):
            raise ValueError(f"{name} items are not all of task {task!r}")
    shared = {str(i.image_path) for i in dev_items} & {str(i.image_path) for i in test_items}
    if shared:
        raise ValueError(f"dev and test share {len(shared)} image(s) (e.g. {sorted(shared)[0]}): steering is chosen "
                         f"on dev and reported on test, so they must be disjoint — use separate splits")


def _open_results(results_path: Path, arguments: dict, fresh: dict) -> dict:
    """The results document of this run: the one on disk if it has the same fingerprint, else `fresh`.

    Raises:
        ProgressMismatchError: the file on disk belongs to a run with other arguments.
    """
    key = digest(arguments)
    if not results_path.exists():
        return {"fingerprint": key, "arguments": {k: v for k, v in arguments.items() if k not in ("dev", "test")},
                **fresh, "results": {}}
    doc = json.loads(results_path.read_text())
    if doc.get("fingerprint") != key:
        task_dir = results_path.parent
        raise ProgressMismatchError(
            f"{task_dir} holds steering results of a run with other arguments ({doc.get('arguments')}); rerun "
            f"with those arguments to continue, or use another --out (or delete {task_dir}) to start over",
            path=results_path)
    return doc


def _run_learned(vlm: VLM, method: str, selection: Selection, dev_items: Sequence[TaskItem],
                 test_items: Sequence[TaskItem], out: Path, task: str, *, ratio: float, cfg: SteerConfig,
                 batch_size: int, progress: bool) -> tuple[dict, Scales]:
    """Train one learned method's scales on dev, write them to `<out>/<task>/`, report them on test."""
    method_cfg = SteerConfig(**{**asdict(cfg), "beta": 0.0}) if method == "learned-nokl" else cfg
    kind = "random" if method == "random" else "hones"
    learned = learn_scales(vlm, dev_items, selection, cfg=method_cfg, checkpoint=_checkpoint_file(out, task, method),
                           batch_size=batch_size, progress=progress,
                           meta={"method": method, "selection": kind, "ratio": ratio})
    file = rankings.write_scales(out / task / scales_file(method), learned.scales)
    evaluation = evaluate(vlm, test_items, plans=Plan.multiply_neurons(learned.scales.multipliers()), batch_size=batch_size,
                          progress=progress)
    settings = {**asdict(method_cfg), "neurons": len(learned.scales), "selection": kind, **learned.history,
                "scale": _scale_stats(learned.scales.scale, method_cfg.clamp),
                "scales_file": file.relative_to(out).as_posix()}
    return _result(method, evaluation, settings), learned.scales


def run_task(vlm: VLM, ranking: TaskRanking, dev_items: Sequence[TaskItem], test_items: Sequence[TaskItem],
             methods: Sequence[str], out: str | Path, *, ratio: float = rankings.DEFAULT_RATIO,
             cfg: SteerConfig = SteerConfig(), batch_size: int = 16, run_info: Mapping | None = None,
             progress: bool = True) -> TaskRun:
    """Base and the chosen steering methods for one task; results in `<out>/<task>/results.json`.

    Args:
        ranking: the task's rankings (its HONES selection at `ratio` is what gets steered).
        dev_items: where grid factors are chosen and scales learned.
        test_items: where every method is reported.
        methods: a subset of `METHODS` (base is always reported).
        out: the output folder; `<out>/<task>/` gets results.json and the learned scales.
        cfg: learned-scaling settings (`random` draws its neurons with `cfg.seed`).
        run_info: JSON-able description of the inputs (files, limits, ...); part of the run's
            fingerprint, so a rerun with other inputs is refused instead of mixing results.

    Returns:
        `TaskRun`: `.doc` is the results document (also written to results.json): "task",
        "metric_name", "neurons", "results" {method: {"method", "metric", "n", "settings"}}, ...;
        `.trained` the scales learned by this call and `.scales(method)` any learned method's.

    Raises:
        ProgressMismatchError (alias `SteeringProgressError`): `<out>/<task>` holds results of a
            run with other arguments.
    """
    task = ranking.task
    _check_inputs(task, dev_items, test_items, methods)
    selection = ranking.select("hones", ratio)
    random_selection = ranking.select("random", ratio, seed=cfg.seed)
    out = Path(out)
    results_path = out / task / RESULTS_FILE
    arguments = {"model": vlm.name, "revision": vlm.revision, "dtype": str(next(vlm.model.parameters()).dtype),
                 "task": task, "ratio": ratio, "cfg": asdict(cfg), "grid": list(GRID),
                 "selection": digest(sorted((l, n) for l, ns in selection.items() for n in ns)),
                 "dev": [str(i.image_path) for i in dev_items], "test": [str(i.image_path) for i in test_items],
                 **dict(run_info or {})}
    doc = _open_results(results_path, arguments, {
        "task": task, "metric_name": TASKS[task].metric, "ratio": ratio,
        "neurons": sum(len(v) for v in selection.values()), "n_dev": len(dev_items), "n_test": len(test_items)})
    done = doc["results"]
    trained: dict[str, Scales] = {}

    def record(method: str, result: dict) -> None:
        done[method] = result
        atomic_write(results_path, (json.dumps(doc, indent=1) + "\n").encode())

    if "base" not in done:
        record("base", _result("base", evaluate(vlm, test_items, batch_size=batch_size, progress=progress), {}))
    for method in (m for m in METHODS if m in methods and m not in done):
        if method == "fixed":
            plan = Plan.scale_neurons(selection, FIXED_FACTOR)
            record(method, _result(method, evaluate(vlm, test_items, plans=plan, batch_size=batch_size,
                                                    progress=progress), {"factor": FIXED_FACTOR}))
        elif method == "grid":
            best, by_factor = grid_search(vlm, dev_items, selection, batch_size=batch_size, progress=progress)
            plan = Plan.scale_neurons(selection, best)
            record(method, _result(method, evaluate(vlm, test_items, plans=plan, batch_size=batch_size,
                                                    progress=progress),
                                   {"factor": best, "dev_metric": {str(f): v for f, v in by_factor.items()}}))
        else:
            result, trained[method] = _run_learned(
                vlm, method, random_selection if method == "random" else selection, dev_items, test_items, out,
                task, ratio=ratio, cfg=cfg, batch_size=batch_size, progress=progress)
            record(method, result)
            _checkpoint_file(out, task, method).unlink(missing_ok=True)   # only once the result is recorded
    return TaskRun(doc=doc, trained=trained, out=out,
                   model=ModelInfo.from_arch(vlm.arch, id=vlm.name, revision=vlm.revision))


def results_table(docs: Sequence[Mapping]) -> str:
    """A markdown table: one row per task, base and each method's test metric (delta to base)."""
    order = ["base", *METHODS]
    present = [m for m in order if any(m in d["results"] for d in docs)]
    names = {"base": "base", "fixed": "Fixed-Amp x2", "grid": "Grid-Search", "learned": "learned",
             "learned-nokl": "learned w/o KL", "random": "RandNeuron (learned)"}
    lines = ["| task | metric | n | neurons | " + " | ".join(names[m] for m in present) + " |",
             "|---|---|---|---|" + "---|" * len(present)]
    for d in docs:
        base = d["results"]["base"]["metric"]
        cells = []
        for m in present:
            r = d["results"].get(m)
            if r is None:
                cells.append("—")
            elif m == "base":
                cells.append(f"{base:.3f}")
            else:
                extra = f", x{r['settings']['factor']}" if m == "grid" else ""
                cells.append(f"{r['metric']:.3f} ({r['metric'] - base:+.3f}{extra})")
        lines.append(f"| {d['task']} | {d['metric_name']} | {d['n_test']} | {d['neurons']} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"
