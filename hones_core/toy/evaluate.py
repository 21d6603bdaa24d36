"""The toy VLM's report card on a fresh split: every well-defined VQA question, per type and size.

A toy-world split stores one VQA question per image, so 300 images hold only ~75 position
questions. `report` asks every question the scene makes well-defined (each (type, target) pair
of `annotate._vqa_options`, in both phrasings) and breaks VQA accuracy down by question type and
by the number of shapes in the image; the other tasks are scored as `evaluate` scores them,
retrieval with 1 + 9 and with 1 + 49 hard negatives (the paper's protocol). Everything goes
through the real evaluation path (`evaluation.evaluate`: generation, answer cleaning, metrics).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .. import metrics
from ..data import read_records
from ..evaluation import evaluate
from ..models import VLM
from ..tasks import TaskItem, items_for_task, vqa_prompt
from .annotate import VQA_TEMPLATES, _vqa_options, ask, scene_from_record
from .world import write_world


def vqa_items(records, scenes) -> list[tuple[TaskItem, str, int]]:
    """(item, question type, number of shapes) for every well-defined question of every image."""
    out = []
    for record, scene in zip(records, scenes):
        for qtype, target in _vqa_options(scene):
            for template in VQA_TEMPLATES[qtype]:
                question, answer = ask(scene, qtype, target, template)
                item = TaskItem("vqa", record.image_path, vqa_prompt(question), (answer,), answer, record.index)
                out.append((item, qtype, len(scene.objects)))
    return out


def report(vlm: VLM, *, seed: int, n: int = 300, shift: str = "none", negatives: tuple[int, ...] = (9, 49),
           batch_size: int = 32, work_dir: str | Path | None = None,
           tasks: tuple[str, ...] = ("vqa", "ocr", "caption", "retrieval")) -> dict:
    """Metrics of `vlm` on the test split of `toy-data --seed SEED --n-test N` (the same images),
    for `tasks` (all four by default)."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        write_world(tmp, seed=seed, n_discovery=0, n_dev=0, n_test=n, shift=shift, progress=False)
        path = Path(tmp) / "test.json"
        records = read_records(path)
        scenes = [scene_from_record(r) for r in json.loads(path.read_text())["data"]]
        out: dict = {"seed": seed, "images": n, "shift": shift}
        if "vqa" in tasks:
            rows = vqa_items(records, scenes)
            result = evaluate(vlm, [item for item, _, _ in rows], batch_size=batch_size)
            scores = [metrics.METRICS["vqa_accuracy"].item_score(p, list(item.targets))
                      for p, (item, _, _) in zip(result.predictions, rows)]
            groups: dict[str, list[float]] = {}
            for score, (_, qtype, shapes) in zip(scores, rows):
                for key in ("all", qtype, f"{qtype}/{shapes}", f"shapes/{shapes}"):
                    groups.setdefault(key, []).append(score)
            out["vqa"] = {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for k, v in sorted(groups.items())}
        for task in [t for t in ("ocr", "caption") if t in tasks]:
            r = evaluate(vlm, items_for_task(task, records), batch_size=batch_size)
            out[task] = {"metric_name": r.metric_name, "metric": round(r.metric, 4), "n": r.n}
        for k in negatives if "retrieval" in tasks else ():
            r = evaluate(vlm, items_for_task("retrieval", records, n_negatives=k), batch_size=batch_size)
            out[f"retrieval_1+{k}"] = {"metric_name": r.metric_name, "metric": round(r.metric, 4), "n": r.n}
    return out


__all__ = ["vqa_items", "report"]
