"""The examples gallery: a folder holding `examples.json` (format in `hones_core.toy.examples`).

Two formats are read: a plain list of examples (the first one, still what
`toy.examples.write_examples` writes), and the chosen gallery (`"format": "hones-examples/2"`,
written by `toy.examples.choose_gallery`), which adds per task how many answers of a fresh split
masking the HONES neurons changed, next to random neurons at the same budget: `gallery_badge`
puts that in one sentence for the page.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import DEFAULT_EXAMPLES
from ..errors import DataFormatError
from ..tasks import TASKS

FORMAT = "hones-examples/2"
COUNTS = ("n", "base_right", "changed_hones", "changed_random", "right_changed_hones")


@dataclass(frozen=True)
class Gallery:
    """A folder's examples by task, and (chosen galleries only) each task's summary and the task to open first."""
    examples: dict[str, list[dict]]
    summaries: dict[str, dict] = field(default_factory=dict)
    default_task: str | None = None


def read_gallery(folder: str | Path = DEFAULT_EXAMPLES) -> Gallery:
    """The gallery of `folder/examples.json` (image paths made absolute); empty without the file.

    Raises:
        DataFormatError: the file is malformed, a summary is incomplete or inconsistent, or an
            example names an image that is missing; the message names the entry and the field.
    """
    folder = Path(folder)
    path = folder / "examples.json"
    out: dict[str, list[dict]] = {task: [] for task in TASKS}
    if not path.is_file():
        return Gallery(out)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err
    summaries: dict[str, dict] = {}
    default = None
    if isinstance(document, dict):
        if document.get("format") != FORMAT:
            raise DataFormatError(f"{path}: an object must say \"format\": \"{FORMAT}\" (got "
                                  f"{document.get('format')!r}); or write the examples as a plain list")
        summaries = check_summaries(document.get("summary"), where=str(path))
        default = document.get("default_task")
        if default is not None and default not in summaries:
            raise DataFormatError(f"{path}: default_task {default!r} must be null or a task of the summary "
                                  f"({', '.join(summaries) or 'none'})")
        entries = document.get("examples")
        if not isinstance(entries, list):
            raise DataFormatError(f"{path}: 'examples' must be a list of examples")
    elif isinstance(document, list):
        entries = document
    else:
        raise DataFormatError(f"{path}: expected a list of examples (or a \"{FORMAT}\" object)")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("task") not in TASKS or not isinstance(entry.get("image"), str):
            raise DataFormatError(f"{path} entry {k}: needs 'task' (one of {', '.join(TASKS)}) and 'image'")
        for flag in ("changes", "changes_random"):
            if flag in entry and not isinstance(entry[flag], bool):
                raise DataFormatError(f"{path} entry {k}: '{flag}' must be true or false, got {entry[flag]!r}")
        image = folder / entry["image"]
        if not image.is_file():
            raise DataFormatError(f"{path} entry {k}: image {entry['image']} is missing")
        out[entry["task"]].append({**entry, "image": str(image)})
    return Gallery(out, summaries, default)


def read_examples(folder: str | Path = DEFAULT_EXAMPLES) -> dict[str, list[dict]]:
    """Examples by task from `folder/examples.json` (image paths made absolute), either format.

    Raises:
        DataFormatError: as `read_gallery`.
    """
    return read_gallery(folder).examples


def check_summaries(value, *, where: str) -> dict[str, dict]:
    """The per-task summaries of a chosen gallery, checked.

    Raises:
        DataFormatError: not an object of tasks; a count missing, not a whole number, negative or
            above n (or right_changed_hones above base_right or changed_hones); a budget outside
            (0, 100]; a factor that is not a number; a split without its integer seed.
    """
    if not isinstance(value, dict):
        raise DataFormatError(f"{where}: 'summary' must be an object with one entry per task")
    out = {}
    for task, s in value.items():
        at = f"{where}: summary of {task!r}"
        if task not in TASKS:
            raise DataFormatError(f"{where}: summary names an unknown task {task!r}; tasks are {', '.join(TASKS)}")
        if not isinstance(s, dict):
            raise DataFormatError(f"{at} must be an object with {', '.join(COUNTS)}, budget_pct, factor and split")
        for key in COUNTS:
            v = s.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataFormatError(f"{at}: '{key}' must be a whole number >= 0, got {v!r}")
        for key in COUNTS[1:]:
            if s[key] > s["n"]:
                raise DataFormatError(f"{at}: '{key}' = {s[key]} is more than the {s['n']} items counted ('n')")
        if s["right_changed_hones"] > min(s["base_right"], s["changed_hones"]):
            raise DataFormatError(f"{at}: 'right_changed_hones' = {s['right_changed_hones']} exceeds base_right "
                                  f"({s['base_right']}) or changed_hones ({s['changed_hones']})")
        for key, low, high in (("budget_pct", 0.0, 100.0), ("factor", -math.inf, math.inf)):
            v = s.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    not (low < v <= high):
                raise DataFormatError(f"{at}: '{key}' must be a number"
                                      + (f" in ({low:g}, {high:g}]" if key == "budget_pct" else "") + f", got {v!r}")
        split = s.get("split")
        if not isinstance(split, dict) or isinstance(split.get("seed"), bool) or not isinstance(split.get("seed"), int):
            raise DataFormatError(f"{at}: 'split' must be an object with the world 'seed' (a whole number) of the "
                                  f"split counted, got {split!r}")
        out[task] = s
    return out


def gallery_badge(task: str, gallery: Gallery | None = None, *, folder: str | Path = DEFAULT_EXAMPLES) -> str:
    """One sentence for the page: how often x factor on the HONES neurons changed this task's
    answers on the gallery's fresh split, next to random neurons; "" without a summary (plain list).

    Args:
        task: a task of `TASKS`.
        gallery: a gallery already read (else `folder` is read).

    Raises:
        DataFormatError: as `read_gallery`.
    """
    gallery = gallery if gallery is not None else read_gallery(folder)
    s = gallery.summaries.get(task)
    if s is None:
        return ""
    n, hones, random = s["n"], s["changed_hones"], s["changed_random"]
    budget = f"{s['budget_pct']:g}%"
    verb = "masking (×0)" if s["factor"] == 0 else f"scaling by ×{s['factor']:g}"
    what = "top-ranked captions" if task == "retrieval" else "answers"
    noun = {"vqa": "questions", "ocr": "text boxes"}.get(task, "images")
    line = (f"On {n} fresh {noun} (world seed {s['split']['seed']}), {verb} these {budget} HONES neurons "
            f"changed {hones} of {n} {what}; {verb.split(' (')[0]} {budget} random neurons (as many per layer) "
            f"changed {random}.")
    if hones == 0:
        line += " So an unchanged answer here is this model's usual case, not an unlucky example."
    return line
