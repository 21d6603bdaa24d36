"""The examples gallery (`hones_core.demo.examples`): both formats, the summaries' checks, the badge."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from hones_core.demo import read_examples
from hones_core.demo.examples import gallery_badge, read_gallery
from hones_core.errors import DataFormatError
from hones_core.tasks import TASKS
from hones_core.toy.examples import write_examples

from conftest import ASSETS


def test_examples_file_round_trips(tmp_path):
    entries = write_examples(tmp_path, seed=7, per_task=2)
    assert [e["task"] for e in entries] == ["vqa"] * 2 + ["ocr"] * 2 + ["caption"] * 2 + ["retrieval"] * 2
    assert json.loads((tmp_path / "examples.json").read_text()) == entries
    assert len({e["image"] for e in entries}) == len(entries)      # every example its own scene
    read = read_examples(tmp_path)
    for entry in read["retrieval"]:
        assert entry["answer"] in entry["candidates"] and len(entry["candidates"]) == 5
    assert all(len(read[t]) == 2 for t in TASKS)
    assert write_examples(tmp_path / "again", seed=7, per_task=2) == entries     # deterministic


def test_bundled_examples_are_readable():
    read = read_examples(ASSETS / "examples")
    assert all(read[t] for t in TASKS)


# ----- the chosen gallery's format (hones-examples/2) ------------------------------------------
def _summary(n=200, right=190, hones=14, random=2, right_hones=12, budget=1.0, factor=0.0, seed=2027):
    return {"n": n, "base_right": right, "changed_hones": hones, "changed_random": random,
            "right_changed_hones": right_hones, "budget_pct": budget, "factor": factor, "method": "hones",
            "baseline": "random", "split": {"seed": seed, "split": "test", "n_images": 200}}


def _document(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    return {"format": "hones-examples/2", "command": "python -m hones_core toy-examples ...",
            "default_task": "caption",
            "summary": {"caption": _summary(), "ocr": _summary(n=101, right=101, hones=0, random=0, right_hones=0)},
            "examples": [{"task": "caption", "image": "a.png", "answer": "a red circle.", "index": 3,
                          "changes": True, "changes_random": False},
                         {"task": "ocr", "image": "b.png", "bbox": [1, 1, 4, 4], "answer": "sun", "index": 5,
                          "changes": False, "changes_random": False}]}


def _write(tmp_path, document):
    (tmp_path / "examples.json").write_text(json.dumps(document))


def test_the_chosen_format_reads_with_its_summaries_and_badges(tmp_path):
    _write(tmp_path, _document(tmp_path))
    gallery = read_gallery(tmp_path)
    assert read_examples(tmp_path) == gallery.examples
    assert [e["answer"] for e in gallery.examples["caption"]] == ["a red circle."]
    assert gallery.examples["caption"][0]["image"] == str(tmp_path / "a.png") and gallery.examples["vqa"] == []
    assert gallery.default_task == "caption" and set(gallery.summaries) == {"caption", "ocr"}
    assert gallery_badge("caption", gallery) == (
        "On 200 fresh images (world seed 2027), masking (×0) these 1% HONES neurons changed 14 of 200 answers; "
        "masking 1% random neurons (as many per layer) changed 2.")
    assert gallery_badge("ocr", folder=tmp_path) == (
        "On 101 fresh text boxes (world seed 2027), masking (×0) these 1% HONES neurons changed 0 of 101 answers; "
        "masking 1% random neurons (as many per layer) changed 0. So an unchanged answer here is this model's "
        "usual case, not an unlucky example.")
    assert gallery_badge("vqa", gallery) == ""          # no summary for the task: no badge


def test_the_plain_list_format_still_reads_without_summaries(tmp_path):
    write_examples(tmp_path, seed=7, per_task=1)
    gallery = read_gallery(tmp_path)
    assert all(len(gallery.examples[t]) == 1 for t in TASKS)
    assert gallery.summaries == {} and gallery.default_task is None
    assert all(gallery_badge(t, gallery) == "" for t in TASKS)


def _break(path, value):
    def apply(doc):
        *keys, last = path
        target = doc
        for k in keys:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return apply


@pytest.mark.parametrize("mutate, message", [
    (_break(("format",), "hones-examples/9"), "must say \"format\": \"hones-examples/2\""),
    (_break(("summary",), [1, 2]), "'summary' must be an object"),
    (_break(("summary", "vqa?"), _summary()), "unknown task 'vqa?'"),
    (_break(("summary", "caption"), 3), "summary of 'caption' must be an object"),
    (_break(("summary", "caption", "changed_random"), KeyError),
     "'changed_random' must be a whole number >= 0, got None"),
    (_break(("summary", "caption", "changed_hones"), -1), "'changed_hones' must be a whole number >= 0, got -1"),
    (_break(("summary", "caption", "changed_hones"), 2.5), "'changed_hones' must be a whole number"),
    (_break(("summary", "caption", "n"), True), "'n' must be a whole number"),
    (_break(("summary", "caption", "changed_random"), 201), "'changed_random' = 201 is more than the 200 items"),
    (_break(("summary", "caption", "right_changed_hones"), 15), "'right_changed_hones' = 15 exceeds"),
    (_break(("summary", "caption", "budget_pct"), 0), "'budget_pct' must be a number in (0, 100], got 0"),
    (_break(("summary", "caption", "budget_pct"), 150), "'budget_pct' must be a number in (0, 100], got 150"),
    (_break(("summary", "caption", "budget_pct"), "1%"), "'budget_pct' must be a number"),
    (_break(("summary", "caption", "factor"), None), "'factor' must be a number, got None"),
    (_break(("summary", "caption", "split"), {"split": "test"}), "'split' must be an object with the world 'seed'"),
    (_break(("default_task",), "vqa"), "default_task 'vqa' must be null or a task of the summary"),
    (_break(("examples",), {"task": "vqa"}), "'examples' must be a list"),
    (_break(("examples", 0, "changes"), "yes"), "entry 0: 'changes' must be true or false"),
    (_break(("examples", 1, "image"), "gone.png"), "entry 1: image gone.png is missing"),
])
def test_malformed_chosen_galleries_are_refused_in_words(tmp_path, mutate, message):
    document = copy.deepcopy(_document(tmp_path))
    mutate(document)
    _write(tmp_path, document)
    with pytest.raises(DataFormatError) as err:
        read_examples(tmp_path)
    assert message in str(err.value) and "examples.json" in str(err.value)


def test_the_bundled_gallery_opens_on_answers_that_change(demo_service):
    """The shipped file: a summary for every task, the first example of a task changing wherever a
    right answer of the split changed, and every flag what the app computes for that file and image."""
    gallery = read_gallery(ASSETS / "examples")
    assert set(gallery.summaries) == set(TASKS)
    assert gallery.default_task is not None
    assert gallery.summaries[gallery.default_task]["right_changed_hones"] > 0
    for task in TASKS:
        s = gallery.summaries[task]
        assert s["budget_pct"] == 1.0 and s["factor"] == 0.0 and s["split"]["seed"] == 2027
        assert f"changed {s['changed_hones']} of {s['n']}" in gallery_badge(task, gallery)
        rows = gallery.examples[task]
        assert 1 <= len(rows) <= 4
        if s["right_changed_hones"]:
            assert rows[0]["changes"] is True, task
        for e in rows:
            fields = dict(task=task, image=e["image"], question=e.get("question"), bbox=e.get("bbox"),
                          candidates=e.get("candidates"), gold=e["answer"], factor=0.0, budget_pct=1.0)
            for method, flag in (("hones", "changes"), ("random", "changes_random")):
                c = demo_service.compute(demo_service.request(**fields, method=method))
                if task == "retrieval":
                    moved = c.base.margins.index(max(c.base.margins)) != c.steered.margins.index(max(c.steered.margins))
                    assert e["candidates"][c.base.margins.index(max(c.base.margins))] == e["answer"]   # base right
                else:
                    moved = c.base.answers[0] != c.steered.answers[0]
                assert moved == e[flag], (task, e["image"], method)
