"""The synthetic world: determinism, file format, correct answers, shifts, vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from hones_core.toy import world

SIZE = world.DEFAULT_IMAGE_SIZE
from hones_core.toy.world import (COLORS, HELDOUT_COMBOS, OCR_WORDS, POSITION_CELLS, POSITIONS,
                                  SHAPES, SHIFTS, SIZES, annotate, generate_scene, render,
                                  tokenize, vocabulary, write_world)

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


def _scenes(n: int, shift: str = "none", seed: int = 0) -> list[world.Scene]:
    rng = random.Random(seed)
    return [generate_scene(rng, shift=shift) for _ in range(n)]


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
            assert vqa["question_type"] in world.VQA_TEMPLATES
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


def test_scenes_are_well_formed():
    for scene in _scenes(200):
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        assert len({o.position for o in objs}) == len(objs)
        boxes = [o.box for o in objs] + ([scene.word_box] if scene.word_box else [])
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert world._overlaps(a, b, 0) is False
        for o in objs:
            assert o.color in COLORS and o.shape in SHAPES and o.size in SIZES
            # Position rule: the whole box lies inside the named cell of the 3x3 grid.
            col, row = POSITION_CELLS[o.position]
            x, y, w, h = o.box
            cell = SIZE / 3
            assert col * cell <= x and x + w <= (col + 1) * cell
            assert row * cell <= y and y + h <= (row + 1) * cell


def test_shapes_are_centred_and_word_boxes_sit_on_the_token_grid():
    """The alignment rule the toy VLM's reading and shape recognition rely on (see world.py)."""
    grid = SIZE // 3
    corners = set()
    for scene in _scenes(300):
        for o in scene.objects:
            col, row = POSITION_CELLS[o.position]
            x, y, w, h = o.box
            assert abs(x + w / 2 - (col + 0.5) * grid) <= 1 and abs(y + h / 2 - (row + 0.5) * grid) <= 1
        if scene.word_box is not None:
            x, y, w, h = scene.word_box
            assert x % grid == 0 and y % grid == 0 and x + w <= SIZE and y + h <= SIZE
            corners.add((x, y))
    assert len(corners) >= 5   # the box still moves around


def test_scene_from_record_gives_back_what_annotate_described():
    rng = random.Random(3)
    for i, scene in enumerate(_scenes(40, seed=4)):
        record = json.loads(json.dumps(annotate(scene, rng, image_id=i, file_name=f"{i}.png")))
        again = world.scene_from_record(record)
        assert again.objects == scene.objects and again.word == scene.word and again.word_box == scene.word_box
        assert world.captions(again) == [c["caption"] for c in record["captions"]]
    with pytest.raises(KeyError, match="no 'scene' key"):
        world.scene_from_record({"image_id": 7, "image_info": {"file_name": "x.png"}})


def test_vqa_answers_match_the_scene():
    rng = random.Random(7)
    seen = set()
    for scene in _scenes(300):
        vqa = annotate(scene, rng, image_id=0, file_name="x.png")["vqa"]
        q, a, qtype = vqa["question"].lower(), vqa["answer"], vqa["question_type"]
        seen.add(qtype)
        objs = scene.objects
        if qtype == "count":
            assert a == str(len(objs))
            assert sorted(set(vqa["all_answers"])) == sorted({a, world.NUMBER_WORDS[len(objs)]})
        elif qtype == "color":
            shape = next(s for s in SHAPES if s in q)
            matches = [o for o in objs if o.shape == shape]
            assert len(matches) == 1 and matches[0].color == a
        elif qtype == "shape":
            color = next(c for c in COLORS if c in q)
            matches = [o for o in objs if o.color == color]
            assert len(matches) == 1 and matches[0].shape == a
        else:
            match = [o for o in objs if f"{o.color} {o.shape}" in q]
            assert len(match) == 1 and match[0].position == a and a in POSITIONS
    assert seen == {"count", "color", "shape", "position"}


def test_captions_describe_the_scene():
    for scene in _scenes(100):
        caps = world.captions(scene)
        assert len(caps) == 5
        for cap in caps:
            assert cap == cap.lower() and cap.endswith(".")
            assert len([t for t in tokenize(cap) if t.isalnum()]) <= 20
            for o in scene.objects:
                assert f"{o.color} {o.shape}" in cap
            assert (scene.word is not None) == any(w in tokenize(cap) for w in OCR_WORDS)


def test_shift_none_never_uses_heldout_combos_and_combos_always_does():
    for scene in _scenes(300, "none"):
        assert not any((o.color, o.shape) in HELDOUT_COMBOS for o in scene.objects)
    rng = random.Random(3)
    for scene in _scenes(100, "combos"):
        assert any((o.color, o.shape) in HELDOUT_COMBOS for o in scene.objects)
        vqa = annotate(scene, rng, image_id=0, file_name="x.png")["vqa"]
        q = vqa["question"].lower()
        assert vqa["question_type"] != "count"
        targeted = [o for o in scene.objects if (o.color, o.shape) in HELDOUT_COMBOS
                    and (o.color in q or o.shape in q)]
        assert targeted


def test_clutter_and_small_text_shifts():
    for scene in _scenes(30, "clutter"):
        assert len(scene.objects) == 3 and len(scene.distractors) >= 1
    small = [s for s in _scenes(30, "small-text") if s.word is not None]
    normal = [s for s in _scenes(30) if s.word is not None]
    assert small and {s.font_size for s in small} == {world.font_size_for(SIZE, "small-text")} == {8}
    assert normal and {s.font_size for s in normal} == {world.font_size_for(SIZE)} == {13}
    assert max(s.word_box[3] for s in small) < min(s.word_box[3] for s in normal)
    # Rendering a cluttered scene puts grey marks on the canvas.
    image = render(_scenes(1, "clutter")[0])
    colors = [rgb for _, rgb in image.getcolors(maxcolors=SIZE * SIZE)]
    assert any(r == g == b and r not in (0, 64, 255) for r, g, b in colors)


def test_unknown_shift_and_tiny_image_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="combos"):
        write_world(tmp_path, seed=0, n_discovery=1, n_dev=1, n_test=1, shift="blur")
    with pytest.raises(ValueError, match="image_size"):
        generate_scene(random.Random(0), image_size=32)


def test_every_generated_token_is_in_the_vocabulary(tmp_path):
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab) and all(w == w.lower() and w.isalnum() for w in vocab)
    assert {"1", "2", "3", "one", "two", "three"} <= vocab
    template_words = vocab - set(OCR_WORDS)
    assert not set(OCR_WORDS) & template_words
    assert all(3 <= len(w) <= 6 and w.isalpha() for w in OCR_WORDS) and len(OCR_WORDS) >= 32
    for shift in SHIFTS:
        for _, rec in world.generate_split(40, seed=0, split="dev", shift=shift):
            texts = [rec["vqa"]["question"], *rec["vqa"]["all_answers"],
                     *(c["caption"] for c in rec["captions"])]
            texts += [rec["ocr"]["text"]] if "ocr" in rec else []
            for text in texts:
                for token in tokenize(text):
                    assert token in vocab or token in "?.,:", (token, text)
                # Nothing outside [a-z0-9] words and ?.,: may hide in the text.
                assert "".join(tokenize(text)) == "".join(text.lower().split())


def test_cli_prints_one_json_summary(tmp_path, capsys):
    world.main(["--out", str(tmp_path), "--seed", "5", "--n-discovery", "2", "--n-dev", "1",
                "--n-test", "1", "--shift", "clutter"])
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["shift"] == "clutter" and summary["splits"]["test"]["n"] == 1
    assert json.loads((tmp_path / "dev.json").read_text())["meta"]["shift"] == "clutter"
