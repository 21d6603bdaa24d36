"""Scenes of the synthetic world: what an image holds, how it is sampled, how it is drawn.

A scene is 1-3 flat shapes on a dark-grey square canvas (96x96 by default), and on about half of the images a
word in black on a white rectangle with a blue (0, 0, 255) outline (the "blue box" the OCR
prompt asks about). `annotate` describes a scene in words; `world` writes splits of them.

Position rule: the canvas is a 3x3 grid; shapes only ever sit in the five cells of the
middle row and middle column (left, right, top, bottom, center), one shape per cell, and
each shape lies entirely inside its cell. So a shape's centre, and its whole bounding box,
name its position unambiguously; corner cells hold no shapes (the word box may go there).

Alignment: shapes sit at the centre of their cell and the word box's top-left corner on the
grid lines (multiples of image_size // 3). At 96 px that is the 32-px block each image token
of the toy VLM covers, so a word or a shape looks the same wherever it is. Our from-scratch
ViT learns such aligned patterns in a few hundred steps, but not the same patterns at
arbitrary pixel offsets within a 20-minute CPU budget (measured: OCR-only training for 600
steps reaches ANLS 1.0 with the box on the grid, 0.04 at free positions). Sizes, colours,
cells, words and box cells still vary.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND: tuple[int, int, int] = (64, 64, 64)
BOX_OUTLINE: tuple[int, int, int] = (0, 0, 255)
BOX_FILL: tuple[int, int, int] = (255, 255, 255)
TEXT_COLOR: tuple[int, int, int] = (0, 0, 0)

# No blue (reserved for the OCR box), no white (the box's fill), no grey (background/clutter).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (255, 150, 30),
    "yellow": (245, 225, 50),
    "green": (50, 190, 70),
    "cyan": (40, 215, 215),
    "purple": (160, 80, 220),
    "pink": (255, 140, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# (column, row) of each position's cell in the 3x3 grid.
POSITION_CELLS: dict[str, tuple[int, int]] = {
    "left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1),
}

OCR_WORDS: tuple[str, ...] = (
    "apple", "bread", "cake", "door", "fish", "goat", "house", "jump", "kite", "lamp",
    "moon", "nest", "ocean", "piano", "queen", "river", "sun", "tiger", "van", "water",
    "zebra", "bird", "cloud", "dog", "egg", "frog", "grape", "hat", "ice", "jar",
    "king", "lion", "milk", "nut", "owl", "pear", "rain", "sock", "tree", "wolf",
)

# Never drawn in shift="none"; shift="combos" puts at least one in every scene.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "star"), ("cyan", "circle"), ("purple", "square"),
)

SHIFTS: tuple[str, ...] = ("none", "combos", "small-text", "clutter")

# The toy VLM sees 96x96 images: its 3x3 grid of 32-px image tokens lines up with the cells below.
DEFAULT_IMAGE_SIZE = 96
# Geometry as fractions of the image side (128 px -> small 20, large 35, font 17).
_SIZE_FRACTION = {"small": 0.16, "large": 0.27}
_FONT_FRACTION = 17 / 128
_SMALL_TEXT_FACTOR = 0.6
_MIN_IMAGE_SIZE = 96
_WORD_PROBABILITY = 0.5


@dataclass(frozen=True)
class SceneObject:
    """One shape; `box` is its bounding box `(x, y, w, h)` in pixels."""

    color: str
    shape: str
    size: str
    position: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Distractor:
    """A grey clutter mark: a dot (`points` = one centre, `width` = radius) or a line."""

    kind: str
    points: tuple[tuple[int, int], ...]
    width: int
    gray: int


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and annotate one image."""

    image_size: int
    shift: str
    objects: tuple[SceneObject, ...]
    word: str | None = None
    word_box: tuple[int, int, int, int] | None = None  # the blue box, COCO (x, y, w, h)
    font_size: int = 0
    distractors: tuple[Distractor, ...] = ()


# --------------------------------------------------------------------------- scene sampling

def check_shift(shift: str) -> None:
    """Raise ValueError unless `shift` is one of `SHIFTS`."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")


def check_image_size(image_size: int) -> None:
    """Raise ValueError when `image_size` is too small for legible shapes and text."""
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is too small for legible shapes and text; "
                         f"use at least {_MIN_IMAGE_SIZE} (the toy VLM uses {DEFAULT_IMAGE_SIZE})")


def font_size_for(image_size: int, shift: str = "none") -> int:
    """OCR font size in pixels: 17 at 128 px, 60 % of that for shift="small-text"."""
    size = round(image_size * _FONT_FRACTION)
    return round(size * _SMALL_TEXT_FACTOR) if shift == "small-text" else size


@functools.lru_cache(maxsize=None)
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled TrueType font at `size` px; raises if Pillow lacks FreeType."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow returned a bitmap font: the toy world needs Pillow >= 10.1 "
                           "built with FreeType (pip install --force-reinstall pillow)")
    return font


def _allowed_combos(shift: str) -> list[tuple[str, str]]:
    combos = [(c, s) for c in COLORS for s in SHAPES]
    if shift == "combos":
        return combos
    return [combo for combo in combos if combo not in HELDOUT_COMBOS]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return not (ax + aw + margin <= bx or bx + bw + margin <= ax
                or ay + ah + margin <= by or by + bh + margin <= ay)


def _place_in_cell(rng: random.Random, position: str, side: int, image_size: int
                   ) -> tuple[int, int, int, int]:
    """A `side`-px square box at the centre of `position`'s cell (see "Alignment" above)."""
    col, row = POSITION_CELLS[position]
    cell = image_size / 3
    return (int((col + 0.5) * cell - side / 2), int((row + 0.5) * cell - side / 2), side, side)


def _word_box_size(word: str, font_size: int) -> tuple[int, int]:
    """(w, h) of the blue box around `word`: text + padding + 2 px outline."""
    font = load_font(font_size)
    left, _, right, _ = font.getbbox(word)
    _, top, _, bottom = font.getbbox("bdfhklpqgy")  # same height for every word
    pad = max(2, font_size // 5)
    return right - left + 2 * pad + 4, bottom - top + 2 * pad + 4


def _sample_objects(rng: random.Random, shift: str, image_size: int) -> tuple[SceneObject, ...]:
    n = 3 if shift == "clutter" else rng.randint(1, 3)
    positions = rng.sample(POSITIONS, n)
    combos = _allowed_combos(shift)
    if shift == "combos":
        first = rng.choice(HELDOUT_COMBOS)
        others = rng.sample([c for c in combos if c != first], n - 1)
        chosen = [first, *others]
    else:
        chosen = rng.sample(combos, n)
    objects = []
    for (color, shape), position in zip(chosen, positions):
        size = rng.choice(SIZES)
        side = round(image_size * _SIZE_FRACTION[size])
        objects.append(SceneObject(color, shape, size, position,
                                   _place_in_cell(rng, position, side, image_size)))
    return tuple(objects)


def _sample_distractors(rng: random.Random, image_size: int,
                        taken: list[tuple[int, int, int, int]]) -> tuple[Distractor, ...]:
    """3-6 small grey dots and lines that touch neither the shapes nor the word box."""
    marks = []
    for _ in range(rng.randint(3, 6)):
        for _attempt in range(50):
            gray = rng.randint(110, 190)
            if rng.random() < 0.5:
                r = rng.randint(2, 3)
                cx, cy = rng.randint(r, image_size - 1 - r), rng.randint(r, image_size - 1 - r)
                mark = Distractor("dot", ((cx, cy),), r, gray)
                box = (cx - r, cy - r, 2 * r + 1, 2 * r + 1)
            else:
                length = rng.randint(8, 14)
                dx, dy = rng.choice([(1, 0), (0, 1), (1, 1), (1, -1)])
                x0 = rng.randint(2, image_size - 3 - length)
                y0 = rng.randint(2 + length, image_size - 3 - length)
                x1, y1 = x0 + dx * length, y0 + dy * length
                mark = Distractor("line", ((x0, y0), (x1, y1)), 2, gray)
                box = (min(x0, x1) - 1, min(y0, y1) - 1, abs(x1 - x0) + 3, abs(y1 - y0) + 3)
            if not any(_overlaps(box, other, 2) for other in taken):
                marks.append(mark)
                taken.append(box)
                break
    return tuple(marks)


def generate_scene(rng: random.Random, *, image_size: int = DEFAULT_IMAGE_SIZE, shift: str = "none") -> Scene:
    """Sample one scene: objects in distinct cells with distinct (colour, shape) pairs, an
    optional word box clear of every object, and grey clutter for shift="clutter"."""
    check_shift(shift)
    check_image_size(image_size)
    font_size = font_size_for(image_size, shift)
    grid = image_size // 3
    has_word = rng.random() < _WORD_PROBABILITY
    for _attempt in range(200):
        objects = _sample_objects(rng, shift, image_size)
        if not has_word:
            word, word_box = None, None
            break
        word = rng.choice(OCR_WORDS)
        w, h = _word_box_size(word, font_size)
        word_box = None
        for _try in range(50):
            x, y = rng.randint(0, image_size - w), rng.randint(0, image_size - h)
            box = (x - x % grid, y - y % grid, w, h)   # top-left corner on the grid lines
            if not any(_overlaps(box, obj.box, 2) for obj in objects):
                word_box = box
                break
        if word_box is not None:
            break
    else:
        raise RuntimeError(f"could not place a word box clear of the shapes at "
                           f"image_size={image_size}; use a larger image_size")
    distractors: tuple[Distractor, ...] = ()
    if shift == "clutter":
        taken = [obj.box for obj in objects] + ([word_box] if word_box else [])
        distractors = _sample_distractors(rng, image_size, taken)
    return Scene(image_size, shift, objects, word, word_box, font_size, distractors)


# --------------------------------------------------------------------------- rendering

def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x, y, w, h = obj.box
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x, y, x + w - 1, y + h - 1), fill=fill)
    elif obj.shape == "square":
        inset = round(w * 0.06)  # a square looks bigger than a circle of the same side
        draw.rectangle((x + inset, y + inset, x + w - 1 - inset, y + h - 1 - inset), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x + (w - 1) / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=fill)
    elif obj.shape == "star":
        cx, cy = x + (w - 1) / 2, y + (h - 1) / 2 + w * 0.05
        outer, inner = (w - 1) / 2 * 1.05, (w - 1) / 2 * 0.45
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            px = min(max(cx + radius * math.cos(angle), x), x + w - 1)
            py = min(max(cy + radius * math.sin(angle), y), y + h - 1)
            points.append((px, py))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; choose one of {', '.join(SHAPES)}")


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of `scene.image_size` pixels square."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for mark in scene.distractors:
        if mark.kind == "dot":
            (cx, cy), r = mark.points[0], mark.width
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(mark.gray,) * 3)
        else:
            draw.line(mark.points, fill=(mark.gray,) * 3, width=mark.width)
    for obj in scene.objects:
        _draw_object(draw, obj)
    if scene.word is not None and scene.word_box is not None:
        x, y, w, h = scene.word_box
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=BOX_FILL, outline=BOX_OUTLINE, width=2)
        font = load_font(scene.font_size)
        left, _, right, _ = font.getbbox(scene.word)
        _, top, _, bottom = font.getbbox("bdfhklpqgy")
        tx = x + (w - (right - left)) / 2 - left
        ty = y + (h - (bottom - top)) / 2 - top
        draw.text((round(tx), round(ty)), scene.word, fill=TEXT_COLOR, font=font)
    return image


__all__ = ["BACKGROUND", "BOX_OUTLINE", "BOX_FILL", "TEXT_COLOR", "COLORS", "SHAPES", "SIZES", "POSITIONS",
           "POSITION_CELLS", "OCR_WORDS", "HELDOUT_COMBOS", "SHIFTS", "DEFAULT_IMAGE_SIZE", "SceneObject",
           "Distractor", "Scene", "check_shift", "check_image_size", "font_size_for", "load_font",
           "generate_scene", "render"]
