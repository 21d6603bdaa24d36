"""The app's examples gallery: a few scenes of the synthetic world per task, as small PNGs.

`write_examples(out, seed=...)` writes `out/examples.json` and the images next to it. The
format (read by `hones_core.demo.read_examples`) is a list of objects:

    {"task": "vqa" | "ocr" | "caption" | "retrieval",
     "image": "<file name in the same folder>",
     "question"?: "...",                  # vqa
     "bbox"?: [x, y, w, h],               # ocr: the box the app draws in blue
     "candidates"?: ["...", ...],         # retrieval: 1 true caption + hard negatives
     "answer"?: "..."}                    # the gold answer (retrieval: the true caption)

Two ways to make it:

- `write_examples(out, seed=...)`: the first scenes of a split of their own
  (`split="examples"`), no model needed (the tests' fixtures use it). Writes the list above.
- `choose_gallery(out, service=...)`: the app's bundled gallery, CHOSEN by running the app's own
  request path (`DemoService.request` + `DemoService.compute`) on every item of a fresh split,
  so a visitor's first click shows the method at work and the badge says how often it does.
  Writes an object (`FORMAT`) with the list under "examples" and a summary per task:

    {"format": "hones-examples/2",
     "command": "python -m hones_core toy-examples --out ... --seed 2027 --n 200 ...",
     "default_task": "caption",                   # most HONES changes beyond random (`default_task`)
     "summary": {task: {"n": N,                   # items of the split for this task
                        "base_right": R,          # ... the base model answers right
                        "changed_hones": X,       # ... whose answer x`factor` on HONES changes
                        "changed_random": Y,      # ... same, on the app's "random" neurons
                        "right_changed_hones": Z, # right AND changed by HONES (gallery candidates)
                        "budget_pct": 1.0, "factor": 0.0, "method": "hones", "baseline": "random",
                        "split": {"seed": 2027, "split": "test", "n_images": 200, ...}}},
     "examples": [{...the fields above..., "index": i,  # the scene's place in the split
                   "changes": true,                # x`factor` on HONES changes the answer
                   "changes_random": false}]}      # ... on the random neurons

The split is the test split of `python -m hones_core toy-data --seed 2027 --n-test 200` (same
scenes; ids counted from 0 here): world seed 2027 was never used to train, rank or evaluate the
toy VLM (those used 1, 777, 778, 780, 4242, 9091). "Changes" is what the app shows: the base and
steered answer strings differ (`clean_answer`-ed, as `demo.compute` returns them); for
retrieval, the top-1 candidate (largest Yes-No margin) differs. "Right": VQA full accuracy
against the question's answers, OCR an exact (case-insensitive) read, a caption equal to one of
the scene's reference captions (word for word; that caption is then the example's gold, so
the app's BLEU reads 1 for the base row), retrieval the true caption ranked first.

Per task the examples are `per_task` scenes the base model answers right, each used by one task
only (tasks in `TASKS` order, scenes in split order): up to `per_task - 1` (at least one) whose
answer HONES x`factor` changes, FIRST, then ones it leaves unchanged (so the gallery also shows
the common case the badge counts), topped up from either kind when one runs short. A task where
no right answer changes gets unchanged examples and a summary that says 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from tqdm import tqdm

from .. import metrics
from ..data import Record, RetrievalItem, build_retrieval_items
from ..demo.examples import FORMAT
from ..tasks import TASKS
from . import world

if TYPE_CHECKING:       # for hints only: writing a plain gallery needs no model code
    from ..demo.compute import Computed
    from ..demo.service import DemoService

EXAMPLES_FILE = "examples.json"
GALLERY_SEED = 2027          # world seed of the gallery's split: never used for anything else
GALLERY_SPLIT = "test"       # = the test split of `toy-data --seed GALLERY_SEED --n-test N`
GALLERY_N = 200


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


# ----- the chosen gallery ---------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One task item of the gallery's split."""
    task: str
    index: int                      # the scene's place in the split
    entry: dict                     # its examples.json fields, "image" left out
    references: tuple[str, ...]     # vqa: the answers; ocr: the text; caption: the captions; retrieval: the true one


@dataclass(frozen=True)
class Outcome:
    """What the app's request path did with one item."""
    item: Item
    right: bool                     # the base model answers it right
    changes: bool                   # x factor on the HONES neurons changes the answer (retrieval: the top-1)
    changes_random: bool            # ... on the app's "random" neurons (same per-layer counts)
    gold: str                       # the gold answer the gallery shows (see `run_item`)


def split_meta(*, seed: int, n: int) -> dict:
    """The gallery split's identity, as stored in each task's summary."""
    return {"seed": seed, "split": GALLERY_SPLIT, "n_images": n, "shift": "none",
            "image_size": world.DEFAULT_IMAGE_SIZE, "generator": world.GENERATOR,
            "same_as": f"the test split of `python -m hones_core toy-data --seed {seed} --n-test {n}` "
                       f"(image ids counted from 0 here)"}


def gallery_items(*, seed: int, n: int, n_negatives: int = 4) -> tuple[list[Image.Image], list[Item]]:
    """The split's scenes and every task item they hold, tasks in `TASKS` order, scenes in split order.

    Args:
        seed: world seed of the split (`GALLERY_SEED` for the bundled gallery).
        n: scenes.
        n_negatives: hard negatives per retrieval item (mined among the split's captions).

    Returns:
        (images, items): `images[item.index]` is the item's scene.

    Raises:
        ValueError: the split is too small to give each retrieval item `n_negatives` negatives.
    """
    scenes = world.generate_split(n, seed=seed, split=GALLERY_SPLIT)
    records = [_record(i, annotation, Path(f"example-{i:03d}.png")) for i, (_, annotation) in enumerate(scenes)]
    items: list[Item] = []
    for r in records:
        if r.question:
            items.append(Item("vqa", r.index, {"task": "vqa", "question": r.question, "answer": r.answer},
                              r.all_answers or (r.answer,)))
    for r in records:
        if r.ocr_text:
            items.append(Item("ocr", r.index, {"task": "ocr", "bbox": [int(v) for v in r.ocr_bbox],
                                               "answer": r.ocr_text}, (r.ocr_text,)))
    for r in records:
        if r.captions:
            items.append(Item("caption", r.index, {"task": "caption", "answer": r.captions[0]}, r.captions))
    retrieval: list[RetrievalItem] = build_retrieval_items(records, n_negatives=n_negatives, seed=seed)
    for it in retrieval:
        true = it.candidates[it.positive]
        items.append(Item("retrieval", it.record_index, {"task": "retrieval", "candidates": list(it.candidates),
                                                         "answer": true}, (true,)))
    return [image for image, _ in scenes], items


def top1(margins: Sequence[float]) -> int:
    """The candidate ranked first (largest Yes-No margin; the first one on a tie)."""
    return max(range(len(margins)), key=lambda k: (margins[k], -k))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def is_right(item: Item, computed: Computed) -> bool:
    """Whether the base answer of `computed` is right for `item` (the rules in the module docstring)."""
    base = computed.base
    if item.task == "retrieval":
        return item.entry["candidates"][top1(base.margins)] == item.references[0]
    answer = base.answers[0]
    if item.task == "vqa":
        return metrics.vqa_accuracy(answer, item.references) >= 1.0
    if item.task == "ocr":
        return answer.strip().lower() == item.references[0].strip().lower()
    return any(_words(answer) == _words(c) for c in item.references)


def changes(computed: Computed) -> bool:
    """Whether the steered row's answer differs from the base row's, as the app compares them."""
    if computed.base.margins:
        return top1(computed.base.margins) != top1(computed.steered.margins)
    return computed.base.answers[0] != computed.steered.answers[0]


def run_item(service: DemoService, item: Item, image: Image.Image, *, budget_pct: float,
             factor: float) -> Outcome:
    """The item through the app's request path: base + HONES row in one pass, then the random row
    from the cached base (what a visitor gets choosing the "random" neuron set)."""
    fields = dict(task=item.task, image=image, question=item.entry.get("question"), bbox=item.entry.get("bbox"),
                  candidates=item.entry.get("candidates"), factor=factor, budget_pct=budget_pct)
    # No gold: it only adds the gold log-prob, which neither the answers nor "changes" depend on.
    hones = service.compute(service.request(**fields, method="hones"))
    random = service.compute(service.request(**fields, method="random"), hones.base)
    right = is_right(item, hones)
    gold = item.entry["answer"]
    if item.task == "caption" and right:
        # A scene has several true captions: show the one the base model said, so the app's BLEU
        # reads 1 for the base row and any drop is the steering's.
        gold = next(c for c in item.references if _words(c) == _words(hones.base.answers[0]))
    return Outcome(item, right, changes(hones), changes(random), gold)


def pick(outcomes: Sequence[Outcome], *, per_task: int, used: set[int]) -> list[Outcome]:
    """A task's examples (the rule in the module docstring); marks their scenes in `used`."""
    right = [o for o in outcomes if o.right and o.item.index not in used]
    moved = [o for o in right if o.changes]
    steady = [o for o in right if not o.changes]
    first = moved[:max(1, per_task - 1)]
    need = per_task - len(first)
    rest = steady[:need]
    extra = moved[len(first):len(first) + need - len(rest)]     # too few unchanged: more changed ones
    chosen = first + extra + rest                                # the changed ones first
    used.update(o.item.index for o in chosen)
    return chosen


def summarize(outcomes: Sequence[Outcome], *, split: dict, budget_pct: float, factor: float) -> dict:
    """A task's counts over the whole split."""
    return {"n": len(outcomes), "base_right": sum(o.right for o in outcomes),
            "changed_hones": sum(o.changes for o in outcomes),
            "changed_random": sum(o.changes_random for o in outcomes),
            "right_changed_hones": sum(o.right and o.changes for o in outcomes),
            "budget_pct": float(budget_pct), "factor": float(factor), "method": "hones", "baseline": "random",
            "split": dict(split)}


def default_task(summary: dict[str, dict]) -> str | None:
    """The task to open first: the most HONES changes beyond random among tasks with a right answer
    that changes (ties: `TASKS` order); None when no task has one."""
    usable = [t for t in TASKS if t in summary and summary[t]["right_changed_hones"] > 0]
    return max(usable, key=lambda t: (summary[t]["changed_hones"] - summary[t]["changed_random"],
                                      -usable.index(t)), default=None)


def choose_gallery(out: str | Path, *, service: DemoService, seed: int = GALLERY_SEED, n: int = GALLERY_N,
                   per_task: int = 3, budget_pct: float = 1.0, factor: float = 0.0, n_negatives: int = 4,
                   command: str | None = None, progress: bool = True,
                   on_outcome: Callable[[Outcome], None] | None = None) -> dict:
    """Run every item of a fresh split through the app, pick the gallery and write it to `out`.

    Writes `out/examples.json` (`FORMAT`, see the module docstring) and the chosen scenes as
    `example-<index>.png`; other `example-*.png` files in `out` (a previous gallery's) are removed.

    Args:
        out: the folder (created).
        service: the app's service (its model and rankings are the ones counted).
        seed: world seed of the split; n: its scenes.
        per_task: examples per task.
        budget_pct, factor: the app's defaults (1 % of all FFN neurons, x0 = masked).
        n_negatives: hard negatives per retrieval item.
        command: how the file was made, stored in it (default: the `toy-examples` call).
        on_outcome: called with each item's outcome (progress, logs).

    Returns:
        The document written to `examples.json`.

    Raises:
        ValueError: `per_task` or `n` below 1, or a split too small for retrieval negatives.
        DemoInputError: the service refuses the budget or factor.
    """
    if per_task < 1 or n < 1:
        raise ValueError(f"need per_task >= 1 and n >= 1, got per_task={per_task}, n={n}")
    out = Path(out)
    images, items = gallery_items(seed=seed, n=n, n_negatives=n_negatives)
    split = split_meta(seed=seed, n=n)
    by_task: dict[str, list[Outcome]] = {t: [] for t in TASKS}
    for item in tqdm(items, desc="gallery", unit="item", disable=not progress):
        outcome = run_item(service, item, images[item.index], budget_pct=budget_pct, factor=factor)
        by_task[item.task].append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    used: set[int] = set()
    summary, entries = {}, []
    for task in TASKS:
        if task not in service.tasks:
            continue
        summary[task] = summarize(by_task[task], split=split, budget_pct=budget_pct, factor=factor)
        for o in pick(by_task[task], per_task=per_task, used=used):
            entries.append({**o.item.entry, "answer": o.gold, "image": f"example-{o.item.index:03d}.png",
                            "index": o.item.index,
                            "changes": o.changes, "changes_random": o.changes_random})
    out.mkdir(parents=True, exist_ok=True)
    keep = {e["image"] for e in entries}
    for stale in out.glob("example-*.png"):
        if stale.name not in keep:
            stale.unlink()
    for e in entries:
        images[e["index"]].save(out / e["image"], format="PNG", optimize=True)
    command = command or (f"python -m hones_core toy-examples --out {out} --seed {seed} --n {n} "
                          f"--per-task {per_task} --budget {budget_pct:g} --factor {factor:g}")
    document = {"format": FORMAT, "command": command, "rankings_for": service.artifact.model.describe(),
                "default_task": default_task(summary), "summary": summary, "examples": entries}
    (out / EXAMPLES_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return document
