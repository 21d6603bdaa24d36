"""The synthetic world's splits: determinism, file format, disjoint splits, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from hones_core.toy import annotate, scenes, world
from hones_core.toy.annotate import VQA_TEMPLATES
from hones_core.toy.scenes import DEFAULT_IMAGE_SIZE, OCR_WORDS, generate_scene
from hones_core.toy.world import write_world

SIZE = DEFAULT_IMAGE_SIZE

COUNTS = dict(n_discovery=12, n_dev=8, n_test=10, n_train=6)


def _write(root: Path, seed: int = 0, **kwargs) -> dict:
    return write_world(root, seed=seed, progress=False, **{**COUNTS, **kwargs})


def _records(root: Path) -> dict[str, list[dict]]:
    return {split: json.loads((root / f"{split}.json").read_text())["data"]
            for split in ("discovery", "dev", "test", "train")}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    _write(root)
    return root


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, world_dir):
    _write(tmp_path / "again")
    _write(tmp_path / "other", seed=1)
    same, again, other = _files(world_dir), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert sum(name.endswith(".png") for name in same) == sum(COUNTS.values())
    assert same == again
    assert same.keys() == other.keys()
    assert same["test.json"] != other["test.json"]
    assert sum(same[k] != other[k] for k in same if k.endswith(".png")) > len(same) // 2


def test_records_follow_merged_coco_format(world_dir):
    for split, records in _records(world_dir).items():
        meta = json.loads((world_dir / f"{split}.json").read_text())["meta"]
        assert meta == {"seed": 0, "split": split, "shift": "none", "image_size": SIZE,
                        "generator": "hones_core.toy.world/1"}
        for rec in records:
            info = rec["image_info"]
            image = Image.open(world_dir / "images" / info["file_name"])
            assert image.size == (info["width"], info["height"]) == (SIZE, SIZE)
            assert image.mode == "RGB"
            assert len(rec["captions"]) == 5
            assert len({c["caption"] for c in rec["captions"]}) == 5
            assert len({c["caption_id"] for c in rec["captions"]}) == 5
            vqa = rec["vqa"]
            assert len(vqa["all_answers"]) == 10 and vqa["answer"] in vqa["all_answers"]
            assert vqa["question_type"] in VQA_TEMPLATES
            assert vqa["answer_type"] == ("number" if vqa["question_type"] == "count" else "other")
            assert ("ocr" in rec) == (rec["scene"]["word"] is not None)


def test_ocr_box_is_inside_the_image_and_outlined_in_blue(world_dir):
    records = [r for rs in _records(world_dir).values() for r in rs if "ocr" in r]
    assert 0.25 < len(records) / sum(COUNTS.values()) < 0.75
    for rec in records:
        x, y, w, h = rec["ocr"]["bbox"]
        assert rec["ocr"]["text"] in OCR_WORDS
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
        pixels = Image.open(world_dir / "images" / rec["image_info"]["file_name"]).load()
        border = ([(x + i, y) for i in range(w)] + [(x + i, y + h - 1) for i in range(w)]
                  + [(x, y + j) for j in range(h)] + [(x + w - 1, y + j) for j in range(h)])
        assert all(pixels[p] == (0, 0, 255) for p in border)
        # Inside: white paper with black ink.
        inside = [pixels[x + i, y + j] for i in range(3, w - 3) for j in range(3, h - 3)]
        assert (255, 255, 255) in inside and min(sum(p) for p in inside) < 100


def test_splits_are_image_disjoint_and_ids_unique(world_dir):
    records = _records(world_dir)
    names = [r["image_info"]["file_name"] for rs in records.values() for r in rs]
    ids = [r["image_id"] for rs in records.values() for r in rs]
    assert len(set(names)) == len(names) == sum(COUNTS.values())
    assert len(set(ids)) == len(ids)
    assert len(list((world_dir / "images").glob("*.png"))) == len(names)


def test_train_json_only_when_requested(tmp_path):
    summary = write_world(tmp_path, seed=0, n_discovery=2, n_dev=2, n_test=2, progress=False)
    assert set(summary["splits"]) == {"discovery", "dev", "test"}
    assert not (tmp_path / "train.json").exists()


def test_unknown_shift_and_tiny_image_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="combos"):
        write_world(tmp_path, seed=0, n_discovery=1, n_dev=1, n_test=1, shift="blur")
    with pytest.raises(ValueError, match="image_size"):
        generate_scene(random.Random(0), image_size=32)


def test_cli_prints_one_json_summary(tmp_path, capsys):
    world.main(["--out", str(tmp_path), "--seed", "5", "--n-discovery", "2", "--n-dev", "1",
                "--n-test", "1", "--shift", "clutter"])
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["shift"] == "clutter" and summary["splits"]["test"]["n"] == 1
    assert json.loads((tmp_path / "dev.json").read_text())["meta"]["shift"] == "clutter"


# Every public name of the single world.py that scenes.py and annotate.py were split out of.
OLD_NAMES = ("BACKGROUND BOX_FILL BOX_OUTLINE COLORS DEFAULT_IMAGE_SIZE Distractor GENERATOR HELDOUT_COMBOS "
             "NUMBER_WORDS OCR_WORDS POSITIONS POSITION_CELLS SHAPES SHIFTS SIZES SPLITS Scene SceneObject "
             "TEXT_COLOR VQA_TEMPLATES annotate captions font_size_for generate_scene generate_split iter_split "
             "load_font main make_vqa render scene_from_record split_rng tokenize vocabulary write_world").split()


def test_world_still_offers_every_name_it_had_before_the_split():
    assert set(world.__all__) == set(OLD_NAMES)
    for name in OLD_NAMES:
        home = next((m for m in (scenes, annotate) if name in m.__all__), world)
        assert getattr(world, name) is getattr(home, name), name
