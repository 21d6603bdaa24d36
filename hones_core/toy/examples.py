"""The app's examples gallery: a few scenes of the synthetic world per task, as small PNGs.

`write_examples(out, seed=...)` writes `out/examples.json` and the images next to it. The
format (read by `hones_core.demo.read_examples`) is a list of objects:

    {"task": "vqa" | "ocr" | "caption" | "retrieval",
     "image": "<file name in the same folder>",
     "question"?: "...",                  # vqa
     "bbox"?: [x, y, w, h],               # ocr: the box the app draws in blue
     "candidates"?: ["...", ...],         # retrieval: 1 true caption + hard negatives
     "answer"?: "..."}                    # the gold answer (retrieval: the true caption)

Scenes come from a split of their own (`split="examples"`), so they are never training images.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import Record, build_retrieval_items
from . import world

EXAMPLES_FILE = "examples.json"


def _record(index: int, annotation: dict, image_path: Path) -> Record:
    fields: dict = {"captions": tuple(c["caption"] for c in annotation["captions"])}
    vqa = annotation.get("vqa")
    if vqa:
        fields.update(question=vqa["question"], answer=vqa["answer"], all_answers=tuple(vqa["all_answers"]))
    ocr = annotation.get("ocr")
    if ocr:
        fields.update(ocr_text=ocr["text"], ocr_bbox=tuple(float(v) for v in ocr["bbox"]))
    return Record(index, str(annotation["image_id"]), image_path, **fields)


def write_examples(out: str | Path, *, seed: int, per_task: int = 3, pool: int = 40,
                   n_negatives: int = 4) -> list[dict]:
    """Write `per_task` examples of each task into `out` and return the `examples.json` entries.

    Args:
        out: the folder (created); holds `examples.json` and `example-<id>.png` files.
        seed: world seed (the scenes are a deterministic function of it).
        per_task: examples per task.
        pool: scenes generated; retrieval negatives are mined among all of their captions.
        n_negatives: hard negatives per retrieval example.
    """
    if per_task < 1 or pool < 4 * per_task:
        raise ValueError(f"need per_task >= 1 and pool >= 4 * per_task, got per_task={per_task}, pool={pool}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = world.generate_split(pool, seed=seed, split="examples")
    records = [_record(i, annotation, out / f"example-{annotation['image_id']:03d}.png")
               for i, (_, annotation) in enumerate(scenes)]
    entries: list[dict] = []
    used: set[int] = set()

    def take(index: int) -> str:
        used.add(index)
        return records[index].image_path.name

    # Each task gets scenes of its own, in order, so the gallery shows different images.
    free = iter(range(pool))
    for _ in range(per_task):
        i = next(free)
        entries.append({"task": "vqa", "image": take(i), "question": records[i].question, "answer": records[i].answer})
    ocr = [i for i in free if records[i].ocr_text][:per_task]
    for i in ocr:
        entries.append({"task": "ocr", "image": take(i), "bbox": [int(v) for v in records[i].ocr_bbox],
                        "answer": records[i].ocr_text})
    rest = [i for i in range(pool) if i not in used]
    for i in rest[:per_task]:
        entries.append({"task": "caption", "image": take(i), "answer": records[i].captions[0]})
    retrieval = {item.record_index: item for item in build_retrieval_items(records, n_negatives=n_negatives,
                                                                           seed=seed)}
    for i in rest[per_task:2 * per_task]:
        item = retrieval[i]
        entries.append({"task": "retrieval", "image": take(i), "candidates": list(item.candidates),
                        "answer": item.candidates[item.positive]})
    for i in sorted(used):
        scenes[i][0].save(records[i].image_path, format="PNG", optimize=True)
    (out / EXAMPLES_FILE).write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return entries
