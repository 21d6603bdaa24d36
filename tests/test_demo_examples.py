"""The examples gallery (`hones_core.demo.examples`)."""

from __future__ import annotations

import json

from hones_core.demo import read_examples
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
