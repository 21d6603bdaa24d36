"""Annotations of the synthetic world: records, correct answers, captions, vocabulary."""

from __future__ import annotations

import json
import random

import pytest

from hones_core.toy.annotate import (NUMBER_WORDS, annotate, captions, scene_from_record, tokenize,
                                     vocabulary)
from hones_core.toy.scenes import COLORS, OCR_WORDS, POSITIONS, SHAPES, SHIFTS, Scene, generate_scene
from hones_core.toy.world import generate_split


def _scenes(n: int, shift: str = "none", seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [generate_scene(rng, shift=shift) for _ in range(n)]


def test_scene_from_record_gives_back_what_annotate_described():
    rng = random.Random(3)
    for i, scene in enumerate(_scenes(40, seed=4)):
        record = json.loads(json.dumps(annotate(scene, rng, image_id=i, file_name=f"{i}.png")))
        again = scene_from_record(record)
        assert again.objects == scene.objects and again.word == scene.word and again.word_box == scene.word_box
        assert captions(again) == [c["caption"] for c in record["captions"]]
    with pytest.raises(KeyError, match="no 'scene' key"):
        scene_from_record({"image_id": 7, "image_info": {"file_name": "x.png"}})


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
            assert sorted(set(vqa["all_answers"])) == sorted({a, NUMBER_WORDS[len(objs)]})
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
        caps = captions(scene)
        assert len(caps) == 5
        for cap in caps:
            assert cap == cap.lower() and cap.endswith(".")
            assert len([t for t in tokenize(cap) if t.isalnum()]) <= 20
            for o in scene.objects:
                assert f"{o.color} {o.shape}" in cap
            assert (scene.word is not None) == any(w in tokenize(cap) for w in OCR_WORDS)


def test_every_generated_token_is_in_the_vocabulary(tmp_path):
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab) and all(w == w.lower() and w.isalnum() for w in vocab)
    assert {"1", "2", "3", "one", "two", "three"} <= vocab
    template_words = vocab - set(OCR_WORDS)
    assert not set(OCR_WORDS) & template_words
    assert all(3 <= len(w) <= 6 and w.isalpha() for w in OCR_WORDS) and len(OCR_WORDS) >= 32
    for shift in SHIFTS:
        for _, rec in generate_split(40, seed=0, split="dev", shift=shift):
            texts = [rec["vqa"]["question"], *rec["vqa"]["all_answers"],
                     *(c["caption"] for c in rec["captions"])]
            texts += [rec["ocr"]["text"]] if "ocr" in rec else []
            for text in texts:
                for token in tokenize(text):
                    assert token in vocab or token in "?.,:", (token, text)
                # Nothing outside [a-z0-9] words and ?.,: may hide in the text.
                assert "".join(tokenize(text)) == "".join(text.lower().split())
