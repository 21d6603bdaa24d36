"""Scenes of the synthetic world: well-formed, aligned to the token grid, shifted as asked."""

from __future__ import annotations

import random

from hones_core.toy import scenes
from hones_core.toy.annotate import annotate
from hones_core.toy.scenes import (COLORS, HELDOUT_COMBOS, POSITION_CELLS, SHAPES, SIZES, Scene,
                                   generate_scene, render)

SIZE = scenes.DEFAULT_IMAGE_SIZE


def _scenes(n: int, shift: str = "none", seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [generate_scene(rng, shift=shift) for _ in range(n)]


def test_scenes_are_well_formed():
    for scene in _scenes(200):
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        assert len({o.position for o in objs}) == len(objs)
        boxes = [o.box for o in objs] + ([scene.word_box] if scene.word_box else [])
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert scenes._overlaps(a, b, 0) is False
        for o in objs:
            assert o.color in COLORS and o.shape in SHAPES and o.size in SIZES
            # Position rule: the whole box lies inside the named cell of the 3x3 grid.
            col, row = POSITION_CELLS[o.position]
            x, y, w, h = o.box
            cell = SIZE / 3
            assert col * cell <= x and x + w <= (col + 1) * cell
            assert row * cell <= y and y + h <= (row + 1) * cell


def test_shapes_are_centred_and_word_boxes_sit_on_the_token_grid():
    """The alignment rule the toy VLM's reading and shape recognition rely on (see scenes.py)."""
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
    assert small and {s.font_size for s in small} == {scenes.font_size_for(SIZE, "small-text")} == {8}
    assert normal and {s.font_size for s in normal} == {scenes.font_size_for(SIZE)} == {13}
    assert max(s.word_box[3] for s in small) < min(s.word_box[3] for s in normal)
    # Rendering a cluttered scene puts grey marks on the canvas.
    image = render(_scenes(1, "clutter")[0])
    colors = [rgb for _, rgb in image.getcolors(maxcolors=SIZE * SIZE)]
    assert any(r == g == b and r not in (0, 64, 255) for r, g, b in colors)
