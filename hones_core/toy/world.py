"""The synthetic world the toy VLM is trained and evaluated on.

A scene is 1-3 flat shapes on a dark-grey square canvas (96x96 by default), and on about half of the images a
word in black on a white rectangle with a blue (0, 0, 255) outline (the "blue box" the OCR
prompt asks about). Every image comes with annotations in the official release's
merged-COCO format: one VQA question with 10 annotator answers, 5 reference captions, and
the OCR word with its box.

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

Everything is a deterministic function of (seed, split, shift, image_size): the same call
gives byte-identical JSON and PNGs (with the same Pillow/FreeType build).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

GENERATOR = "hones_core.toy.world/1"

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
# Reading order, used to list objects in captions.
_READING_ORDER = ("top", "left", "center", "right", "bottom")

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

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# The toy VLM sees 96x96 images: its 3x3 grid of 32-px image tokens lines up with the cells below.
DEFAULT_IMAGE_SIZE = 96
# Geometry as fractions of the image side (128 px -> small 20, large 35, font 17).
_SIZE_FRACTION = {"small": 0.16, "large": 0.27}
_FONT_FRACTION = 17 / 128
_SMALL_TEXT_FACTOR = 0.6
_MIN_IMAGE_SIZE = 96
_WORD_PROBABILITY = 0.5

VQA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape}?", "Which color does the {shape} have?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "position": ("Where is the {color} {shape}?",
                 "In which part of the image is the {color} {shape}?"),
}
_ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "position": "other"}

_POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
}
# Fixed words of the caption templates (see `captions`); used by `vocabulary`.
_CAPTION_WORDS = ("a an the and with is image shape shapes sign that says word blue box "
                  "saying on at in of")

_TOKEN = re.compile(r"[a-z0-9]+|[?.,:]")


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


# --------------------------------------------------------------------------- text helpers

def tokenize(text: str) -> list[str]:
    """Lowercase and split into `[a-z0-9]+` words and `? . , :` (what the toy tokenizer sees)."""
    return _TOKEN.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word (no punctuation) any generated question, answer, caption or OCR text can
    contain, lowercase and sorted; punctuation is only ever `? . , :`."""
    words: set[str] = set()
    for templates in VQA_TEMPLATES.values():
        for template in templates:
            words.update(tokenize(re.sub(r"\{\w+\}", " ", template)))
    words.update(tokenize(_CAPTION_WORDS))
    words.update(COLORS, SHAPES, SIZES, POSITIONS, OCR_WORDS, NUMBER_WORDS.values())
    words.update(str(n) for n in NUMBER_WORDS)
    for phrase in _POSITION_PHRASES.values():
        words.update(tokenize(phrase))
    return sorted(w for w in words if w.isalnum())


# --------------------------------------------------------------------------- scene sampling

def _check_shift(shift: str) -> None:
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")


def _check_image_size(image_size: int) -> None:
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
    _check_shift(shift)
    _check_image_size(image_size)
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


# --------------------------------------------------------------------------- annotations

def _ordered(objects: Sequence[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: _READING_ORDER.index(o.position))


def _a(word: str) -> str:
    """`word` with its indefinite article ("an orange", "a red")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions(scene: Scene) -> list[str]:
    """Five reference captions (lowercase, <= 20 words), one per template, objects in
    reading order (top, left, center, right, bottom), the word last when present."""
    objs = _ordered(scene.objects)
    word = scene.word
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"

    sized = [_a(f"{o.size} {o.color} {o.shape}") for o in objs]
    placed = [f"{o.color} {o.shape} {_POSITION_PHRASES[o.position]}" for o in objs]
    plain = [_a(f"{o.color} {o.shape}") for o in objs]
    sizes = [f"the {o.color} {o.shape} is {o.size}" for o in objs]
    if word is not None:
        sized.append(f"a sign that says {word}")
        placed.append(f"the word {word}")
        sizes.append(f"the word is {word}")
    counted = f"{NUMBER_WORDS[n]} {noun}: {_join(plain)}"
    if word is not None:
        counted += f", with the word {word}"
    boxed = plain + ([f"a blue box saying {word}"] if word is not None else [])
    return [
        _join(sized) + ".",
        _join(placed) + ".",
        counted + ".",
        "an image with " + _join(boxed) + ".",
        _join(sizes) + ".",
    ]


def _vqa_options(scene: Scene) -> list[tuple[str, SceneObject | None]]:
    """(question type, target object) pairs whose answer is unique in this scene."""
    objs = scene.objects
    options: list[tuple[str, SceneObject | None]] = []
    for obj in objs:
        if sum(o.shape == obj.shape for o in objs) == 1:
            options.append(("color", obj))
        if sum(o.color == obj.color for o in objs) == 1:
            options.append(("shape", obj))
        options.append(("position", obj))
    if scene.shift == "combos":
        # Ask about a held-out combination; "position" always qualifies.
        return [(t, o) for t, o in options
                if o is not None and (o.color, o.shape) in HELDOUT_COMBOS]
    return options + [("count", None)]


def make_vqa(scene: Scene, rng: random.Random, *, question_id: int) -> dict:
    """One question: the type uniformly among those well-defined for the scene, then a
    target uniformly among the objects it can ask about, then one of two phrasings."""
    options = _vqa_options(scene)
    qtype = rng.choice(sorted({t for t, _ in options}))
    target = rng.choice([o for t, o in options if t == qtype])
    template = rng.choice(VQA_TEMPLATES[qtype])
    if qtype == "count":
        question, answer = template, str(len(scene.objects))
    else:
        assert target is not None
        question = template.format(color=target.color, shape=target.shape)
        answer = {"color": target.color, "shape": target.shape,
                  "position": target.position}[qtype]
    all_answers = [answer] * 10
    # Annotators sometimes write numbers as words or capitalise: VQA normalisation matters.
    if qtype == "count":
        variant, n_variants = NUMBER_WORDS[int(answer)], rng.randint(2, 4)
    else:
        variant, n_variants = answer.capitalize(), rng.randint(0, 2)
    for i in rng.sample(range(1, 10), n_variants):
        all_answers[i] = variant
    return {"question_id": question_id, "question": question, "answer": answer,
            "all_answers": all_answers, "question_type": qtype,
            "answer_type": _ANSWER_TYPES[qtype]}


def annotate(scene: Scene, rng: random.Random, *, image_id: int, file_name: str) -> dict:
    """The merged-COCO record for `scene` (plus a "scene" key describing what was drawn)."""
    size = scene.image_size
    record: dict = {
        "image_id": image_id,
        "image_info": {"file_name": file_name, "height": size, "width": size},
        "vqa": make_vqa(scene, rng, question_id=image_id),
        "captions": [{"caption_id": image_id * 5 + k, "caption": text}
                     for k, text in enumerate(captions(scene))],
    }
    if scene.word is not None and scene.word_box is not None:
        record["ocr"] = {"text": scene.word, "bbox": list(scene.word_box)}
    record["scene"] = {
        "shift": scene.shift,
        "objects": [{"color": o.color, "shape": o.shape, "size": o.size,
                     "position": o.position, "bbox": list(o.box)} for o in scene.objects],
        "word": scene.word,
        "font_size": scene.font_size if scene.word is not None else None,
        "n_distractors": len(scene.distractors),
    }
    return record


def scene_from_record(record: dict) -> Scene:
    """The scene (objects, word, shift) that `annotate` described under a record's "scene" key,
    enough to ask new questions about it; clutter marks are not recorded, so none come back."""
    if "scene" not in record:
        raise KeyError(f"record {record.get('image_id')!r} has no 'scene' key: it was not written by the toy world")
    scene = record["scene"]
    objects = tuple(SceneObject(o["color"], o["shape"], o["size"], o["position"], tuple(o["bbox"]))
                    for o in scene["objects"])
    box = tuple(record["ocr"]["bbox"]) if "ocr" in record else None
    return Scene(record["image_info"]["width"], scene["shift"], objects, scene["word"], box,
                 scene["font_size"] or 0)


# --------------------------------------------------------------------------- splits

def split_rng(seed: int, split: str, shift: str = "none") -> random.Random:
    """The RNG of one split: seeded with a string, which (unlike hash()) is not salted."""
    return random.Random(f"{GENERATOR}:{seed}:{split}:{shift}")


def iter_split(n: int, *, seed: int, split: str = "train", image_size: int = DEFAULT_IMAGE_SIZE,
               shift: str = "none", start_id: int = 0
               ) -> Iterator[tuple[Image.Image, dict]]:
    """Yield `n` (image, record) pairs with image ids `start_id .. start_id + n - 1` and
    file names `{image_id:05d}.png`."""
    _check_shift(shift)
    _check_image_size(image_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = split_rng(seed, split, shift)
    for image_id in range(start_id, start_id + n):
        scene = generate_scene(rng, image_size=image_size, shift=shift)
        record = annotate(scene, rng, image_id=image_id, file_name=f"{image_id:05d}.png")
        yield render(scene), record


def generate_split(n: int, *, seed: int, split: str = "train", image_size: int = DEFAULT_IMAGE_SIZE,
                   shift: str = "none", start_id: int = 0) -> list[tuple[Image.Image, dict]]:
    """`n` (image, record) pairs in memory; see `iter_split`."""
    return list(iter_split(n, seed=seed, split=split, image_size=image_size, shift=shift,
                           start_id=start_id))


# Ids are assigned in this order, so adding a train split never renumbers the eval splits.
SPLITS: tuple[str, ...] = ("discovery", "dev", "test", "train")


def write_world(out_dir: str | Path, *, seed: int, n_discovery: int, n_dev: int, n_test: int,
                n_train: int = 0, image_size: int = DEFAULT_IMAGE_SIZE, shift: str = "none",
                progress: bool = True) -> dict:
    """Write `out_dir/images/*.png` and `{split}.json` for each split (train only when
    `n_train > 0`), each `{"data": [...], "meta": {...}}`. Returns a summary dict."""
    _check_shift(shift)
    _check_image_size(image_size)
    counts = {"discovery": n_discovery, "dev": n_dev, "test": n_test, "train": n_train}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out_dir": str(out), "images_dir": str(images_dir), "seed": seed,
                     "shift": shift, "image_size": image_size, "splits": {}}
    next_id = 0
    bar = tqdm(total=sum(counts.values()), desc="toy world", unit="img", disable=not progress)
    for split in SPLITS:
        n = counts[split]
        if split == "train" and n == 0:
            continue
        records = []
        for image, record in iter_split(n, seed=seed, split=split, image_size=image_size,
                                        shift=shift, start_id=next_id):
            image.save(images_dir / record["image_info"]["file_name"], format="PNG")
            records.append(record)
            bar.update(1)
        next_id += n
        meta = {"seed": seed, "split": split, "shift": shift, "image_size": image_size,
                "generator": GENERATOR}
        path = out / f"{split}.json"
        path.write_text(json.dumps({"data": records, "meta": meta}) + "\n", encoding="utf-8")
        summary["splits"][split] = {"n": n, "n_ocr": sum("ocr" in r for r in records),
                                    "path": str(path)}
    bar.close()
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: write a toy world and print its summary as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m hones_core toy-data",
                                     description="Write the synthetic toy world.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-discovery", type=int, default=200)
    parser.add_argument("--n-dev", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--n-train", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--shift", choices=SHIFTS, default="none")
    args = parser.parse_args(argv)
    summary = write_world(args.out, seed=args.seed, n_discovery=args.n_discovery,
                          n_dev=args.n_dev, n_test=args.n_test, n_train=args.n_train,
                          image_size=args.image_size, shift=args.shift)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
