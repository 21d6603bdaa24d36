"""The chosen examples gallery (`hones_core.toy.examples.choose_gallery`) and its `toy-examples` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hones_core.data import Record, build_retrieval_items
from hones_core.demo import read_examples
from hones_core.demo.examples import read_gallery
from hones_core.tasks import TASKS
from hones_core.toy import world
from hones_core.toy.examples import Item, Outcome, choose_gallery, pick

SEED, N = 2027, 12


def _plain_items(n: int, seed: int) -> list[tuple[str, int, dict, object]]:
    """Every task item of the split, built here from the world's records: (task, scene, inputs, gold)."""
    scenes = world.generate_split(n, seed=seed, split="test")
    out = []
    for i, (_, rec) in enumerate(scenes):
        if rec.get("vqa"):
            out.append(("vqa", i, {"question": rec["vqa"]["question"]}, rec["vqa"]["all_answers"]))
    for i, (_, rec) in enumerate(scenes):
        if rec.get("ocr"):
            out.append(("ocr", i, {"bbox": rec["ocr"]["bbox"]}, rec["ocr"]["text"]))
    for i, (_, rec) in enumerate(scenes):
        out.append(("caption", i, {}, [c["caption"] for c in rec["captions"]]))
    records = [Record(i, str(i), Path(f"{i}.png"), captions=tuple(c["caption"] for c in rec["captions"]))
               for i, (_, rec) in enumerate(scenes)]
    for it in build_retrieval_items(records, n_negatives=4, seed=seed):
        out.append(("retrieval", it.record_index, {"candidates": list(it.candidates)}, it.positive))
    return [(t, i, inputs, gold, scenes[i][0]) for t, i, inputs, gold in out]


def _right(task, base, gold) -> bool:
    if task == "vqa":       # full VQA credit: at least 3 annotators (all of them when fewer) gave it
        hits = sum(a.lower() == base.answers[0].lower() for a in gold)
        return hits >= min(3, len(gold))
    if task == "ocr":
        return base.answers[0].lower() == gold.lower()
    if task == "caption":
        words = re.findall(r"[a-z0-9]+", base.answers[0].lower())
        return any(re.findall(r"[a-z0-9]+", c.lower()) == words for c in gold)
    margins = base.margins
    return margins.index(max(margins)) == gold


def _changed(base, steered) -> bool:
    if base.margins:
        return base.margins.index(max(base.margins)) != steered.margins.index(max(steered.margins))
    return base.answers[0] != steered.answers[0]


def test_counts_and_choices_match_a_plain_loop_over_the_split(demo_service, tmp_path):
    (tmp_path / "example-999.png").write_bytes(b"stale")       # a previous gallery's image goes
    doc = choose_gallery(tmp_path, service=demo_service, seed=SEED, n=N, per_task=2, progress=False)
    assert not (tmp_path / "example-999.png").exists()
    counts = {t: {"n": 0, "base_right": 0, "changed_hones": 0, "changed_random": 0, "right_changed_hones": 0}
              for t in TASKS}
    seen = {}
    for task, index, inputs, gold, image in _plain_items(N, SEED):
        fields = dict(task=task, image=image, factor=0.0, budget_pct=1.0, **inputs)
        hones = demo_service.compute(demo_service.request(**fields, method="hones"))
        random = demo_service.compute(demo_service.request(**fields, method="random"))   # its own base row
        assert random.base.answers == hones.base.answers
        right, moved = _right(task, hones.base, gold), _changed(hones.base, hones.steered)
        c = counts[task]
        c["n"] += 1
        c["base_right"] += right
        c["changed_hones"] += moved
        c["changed_random"] += _changed(random.base, random.steered)
        c["right_changed_hones"] += right and moved
        seen[task, index] = (right, moved, _changed(random.base, random.steered), hones.base.answers, gold)
    for task in TASKS:
        got = doc["summary"][task]
        assert {k: got[k] for k in counts[task]} == counts[task], task
        assert got["budget_pct"] == 1.0 and got["factor"] == 0.0 and got["split"]["seed"] == SEED
        assert got["split"]["split"] == "test" and got["split"]["n_images"] == N
    assert counts["caption"]["right_changed_hones"] > 0        # the test shows something: captions move on the toy
    # the examples: right, each its own scene, flags as recomputed, a changing one first where one exists
    by_task = read_examples(tmp_path)
    images = [e["image"] for rows in by_task.values() for e in rows]
    assert len(images) == len(set(images)) == sum(len(r) for r in by_task.values())
    for task in TASKS:
        rows = by_task[task]
        assert 1 <= len(rows) <= 2
        for e in rows:
            right, moved, moved_random, base, gold = seen[task, e["index"]]
            assert right and e["changes"] == moved and e["changes_random"] == moved_random
            if task == "caption":       # the gold shown is the true caption the base model said
                assert e["answer"] in gold and e["answer"].rstrip(".") == base[0].rstrip(".")
        if counts[task]["right_changed_hones"]:
            assert rows[0]["changes"] is True
    best = max(TASKS, key=lambda t: (counts[t]["right_changed_hones"] > 0,
                                     counts[t]["changed_hones"] - counts[t]["changed_random"], -list(TASKS).index(t)))
    assert doc["default_task"] == best
    assert json.loads((tmp_path / "examples.json").read_text()) == doc
    assert read_gallery(tmp_path).default_task == best


def test_the_app_on_the_written_file_sees_what_the_file_says(demo_service, tmp_path):
    """The written PNG, read back through the app's request path with its gold: same flags."""
    doc = choose_gallery(tmp_path, service=demo_service, seed=SEED, n=6, per_task=1, progress=False)
    for entry in doc["examples"]:
        fields = dict(task=entry["task"], image=str(tmp_path / entry["image"]), question=entry.get("question"),
                      bbox=entry.get("bbox"), candidates=entry.get("candidates"), gold=entry["answer"],
                      factor=0.0, budget_pct=1.0)
        for method, flag in (("hones", "changes"), ("random", "changes_random")):
            computed = demo_service.compute(demo_service.request(**fields, method=method))
            assert _changed(computed.base, computed.steered) == entry[flag], (entry, method)


def _outcome(index: int, right: bool, changes: bool) -> Outcome:
    return Outcome(Item("caption", index, {"task": "caption", "answer": "x"}, ("x",)), right, changes, False, "x")


def test_pick_puts_a_changing_right_answer_first_and_keeps_unchanged_ones():
    outcomes = [_outcome(0, True, False), _outcome(1, False, True), _outcome(2, True, True),
                _outcome(3, True, False), _outcome(4, True, True), _outcome(5, True, True)]
    used = {5}
    chosen = pick(outcomes, per_task=3, used=used)
    # right only (not 1), scene 5 taken by another task; 2 changing ones at most, first; then unchanged
    assert [o.item.index for o in chosen] == [2, 4, 0]
    assert used == {0, 2, 4, 5}
    assert [o.item.index for o in pick(outcomes, per_task=1, used=set())] == [2]
    # too few unchanged ones: topped up with changing ones, still before the unchanged
    assert [o.item.index for o in pick(outcomes[:3], per_task=3, used=set())] == [2, 0]
    assert [o.item.index for o in pick([_outcome(0, True, True), _outcome(1, True, True), _outcome(2, True, True)],
                                       per_task=3, used=set())] == [0, 1, 2]
    # nothing changes: unchanged examples, honestly
    assert [o.item.index for o in pick([_outcome(0, True, False), _outcome(1, True, False)], per_task=3,
                                       used=set())] == [0, 1]


def test_toy_examples_command(tmp_path, capsys):
    from hones_core.cli import main

    main(["toy-examples", "--out", str(tmp_path / "g"), "--n", "6", "--per-task", "1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads((tmp_path / "g" / "examples.json").read_text())
    assert line["default_task"] == doc["default_task"] and line["examples"] == len(doc["examples"])
    assert {t: s["changed_hones"] for t, s in line["summary"].items()} == \
        {t: s["changed_hones"] for t, s in doc["summary"].items()}
    assert doc["command"].startswith("python -m hones_core toy-examples") and "--seed 2027 --n 6" in doc["command"]
    assert all(s["split"]["seed"] == 2027 for s in doc["summary"].values())
    main(["toy-examples", "--out", str(tmp_path / "plain"), "--seed", "7", "--per-task", "1", "--plain"])
    assert isinstance(json.loads((tmp_path / "plain" / "examples.json").read_text()), list)
