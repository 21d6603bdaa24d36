"""Annotations of a scene in the official release's merged-COCO format, and their words.

Every image comes with one VQA question with 10 annotator answers, 5 reference captions,
and the OCR word with its box (`annotate`); `scene_from_record` reads a scene back from
such a record. `tokenize` and `vocabulary` give the words any of this text can contain,
which is what the toy VLM's tokenizer is built from.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from .scenes import COLORS, HELDOUT_COMBOS, OCR_WORDS, POSITIONS, SHAPES, SIZES, Scene, SceneObject

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

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
# Reading order, used to list objects in captions.
_READING_ORDER = ("top", "left", "center", "right", "bottom")
# Fixed words of the caption templates (see `captions`); used by `vocabulary`.
_CAPTION_WORDS = ("a an the and with is image shape shapes sign that says word blue box "
                  "saying on at in of")

_TOKEN = re.compile(r"[a-z0-9]+|[?.,:]")


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


def describes(caption: str, scene: Scene) -> bool:
    """Whether `caption` is true of `scene`: exactly when it is one of the scene's five captions.

    Exact, not a heuristic: every caption template names every shape (with the attributes that
    template names) and the word when there is one, in a fixed order, so a caption made from
    any scene by any template is true of `scene` only if the same template gives the same words
    for `scene`. Compared lowercased and without spaces before punctuation, as the tokenizer does.
    """
    key = " ".join(tokenize(caption))
    return any(" ".join(tokenize(own)) == key for own in captions(scene))


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


def ask(scene: Scene, qtype: str, target: SceneObject | None, template: str) -> tuple[str, str]:
    """The question `template` asks about `target` (None for counting) and its answer in `scene`."""
    if qtype == "count":
        return template, str(len(scene.objects))
    assert target is not None
    answer = {"color": target.color, "shape": target.shape, "position": target.position}[qtype]
    return template.format(color=target.color, shape=target.shape), answer


def draw_question(scene: Scene, rng: random.Random, types: Sequence[str] | None = None
                  ) -> tuple[str, SceneObject | None, str, str]:
    """(type, target, question, answer): the type uniformly among those well-defined for the
    scene (among `types` when one of them is), then a target uniformly among the objects it can
    ask about, then one of two phrasings."""
    options = _vqa_options(scene)
    available = sorted({t for t, _ in options})
    if types is not None:
        available = [t for t in available if t in types] or available
    qtype = rng.choice(available)
    target = rng.choice([o for t, o in options if t == qtype])
    question, answer = ask(scene, qtype, target, rng.choice(VQA_TEMPLATES[qtype]))
    return qtype, target, question, answer


def make_vqa(scene: Scene, rng: random.Random, *, question_id: int) -> dict:
    """One question (`draw_question`) with 10 annotator answers."""
    qtype, _, question, answer = draw_question(scene, rng)
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


__all__ = ["NUMBER_WORDS", "VQA_TEMPLATES", "tokenize", "vocabulary", "captions", "describes", "ask", "draw_question", "make_vqa", "annotate",
           "scene_from_record"]
