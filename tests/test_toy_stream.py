"""The toy VLM's training stream: fresh, seeded examples whose answers are true of the drawn scene."""

import pytest

from hones_core.toy.annotate import _vqa_options, captions, describes
from hones_core.toy.scenes import Scene, SceneObject
from hones_core.toy.stream import Mix, batch, perturb, step_rng

STAR = SceneObject("red", "star", "large", "left", (0, 0, 1, 1))


def _scene(*objects, word=None):
    return Scene(96, "none", tuple(objects), word, (64, 64, 30, 20) if word else None, 13 if word else 0)


def test_describes_by_hand():
    scene = _scene(STAR, SceneObject("pink", "circle", "small", "top", (0, 0, 1, 1)))
    assert captions(scene)[0] == "a small pink circle and a large red star."     # reading order: top, then left
    assert describes("A small pink circle and a large red star .", scene)         # case and spacing do not matter
    assert not describes("a small pink circle and a small red star.", scene)      # wrong size
    assert not describes("a large red star.", scene)                              # leaves out the circle
    assert describes("an image with a pink circle and a red star.", scene)       # this template names no sizes
    # the same objects with another size: template 4 (no sizes) is still true, template 1 is not
    other = _scene(SceneObject("red", "star", "small", "left", (0, 0, 1, 1)),
                   SceneObject("pink", "circle", "small", "top", (0, 0, 1, 1)))
    assert describes(captions(other)[3], scene) and not describes(captions(other)[0], scene)
    assert not describes(captions(_scene(STAR, word="owl"))[3], _scene(STAR))    # the word is named


def test_batches_are_seeded_per_step_and_fresh_across_steps():
    mix = Mix()
    first = batch(0, "instruct", 5, mix, 16)
    assert first == batch(0, "instruct", 5, mix, 16)
    assert first != batch(0, "instruct", 6, mix, 16)
    assert first != batch(1, "instruct", 5, mix, 16)
    assert first != batch(0, "lookup", 5, mix, 16)


def test_every_answer_is_true_of_its_scene():
    seen = {"vqa": 0, "ocr": 0, "caption": 0, "Yes": 0, "No": 0}
    for step in range(12):
        for s in batch(3, "instruct", step, Mix(), 32):
            if s.task == "vqa":
                question = s.prompt.split("Question: ")[1].split("\n")[0]
                possible = set()
                for qtype, target in _vqa_options(s.scene):
                    if qtype == "count":
                        possible.add(str(len(s.scene.objects)))
                    elif {"color": target.shape in question, "shape": target.color in question,
                          "position": target.shape in question and target.color in question}[qtype]:
                        possible.add({"color": target.color, "shape": target.shape, "position": target.position}[qtype])
                assert s.answer in possible, (question, s.answer, s.scene)
                seen["vqa"] += 1
            elif s.task == "ocr":
                assert s.answer == s.scene.word
                seen["ocr"] += 1
            elif s.task == "caption":
                assert s.answer in captions(s.scene)
                seen["caption"] += 1
            else:
                caption = s.prompt.split("Candidate: ")[1].split("\n")[0]
                assert describes(caption, s.scene) == (s.answer == "Yes"), (caption, s.answer, s.scene)
                seen[s.answer] += 1
    assert min(seen.values()) > 10, seen


def test_mix_restricts_tasks_question_types_and_shapes():
    mix = Mix(tasks=(("vqa", 1.0),), question_types=("position",), max_shapes=2)
    samples = [s for step in range(5) for s in batch(0, "lookup", step, mix, 32)]
    assert {s.task for s in samples} == {"vqa"}
    assert {s.question_type for s in samples} == {"position"}     # always well-defined
    assert max(len(s.scene.objects) for s in samples) == 2
    with pytest.raises(ValueError, match="tasks of"):
        Mix(tasks=(("vqa", 1.0), ("translate", 1.0)))
    with pytest.raises(ValueError, match="question types"):
        Mix(question_types=("size",))


def test_perturbed_scenes_differ_in_one_thing_and_stay_drawable():
    rng = step_rng(0, "test", 0)
    for step in range(200):
        scene = batch(0, "perturb", step, Mix(), 1)[0].scene
        changed = perturb(scene, rng)
        assert changed != scene
        assert len({(o.color, o.shape) for o in changed.objects}) == len(changed.objects) <= 3
        assert len({o.position for o in changed.objects}) == len(changed.objects) >= 1
        assert abs(len(changed.objects) - len(scene.objects)) <= 1


def test_evaluation_negatives_are_false_for_their_image(tmp_path):
    """The retrieval items `evaluate` and `rank` build from a world split: no negative describes the image."""
    import json

    from hones_core.data import read_records
    from hones_core.tasks import items_for_task
    from hones_core.toy.annotate import scene_from_record
    from hones_core.toy.world import write_world

    write_world(tmp_path, seed=11, n_discovery=0, n_dev=0, n_test=120, progress=False)
    records = read_records(tmp_path / "test.json")
    scenes = {r.index: scene_from_record(raw) for r, raw in
              zip(records, json.loads((tmp_path / "test.json").read_text())["data"])}
    items = items_for_task("retrieval", records, n_negatives=49)
    assert len(items) == 120
    for item in items:
        scene = scenes[item.record_index]
        truths = [describes(c, scene) for c in item.candidates]
        assert truths[item.positive] and sum(truths) == 1, item


def test_target_cells_point_at_the_token_the_answer_is_read_from():
    from hones_core.toy.scenes import POSITION_CELLS

    def named(obj, question):
        """Whether the question names this shape the way its type does."""
        words = question.lower().rstrip("?").split()
        return {"color": obj.shape in words, "shape": obj.color in words,
                "position": obj.shape in words and obj.color in words}

    samples = [s for step in range(6) for s in batch(2, "instruct", step, Mix(), 32)]
    for s in samples:
        if s.task == "ocr":
            x, y, _, _ = s.scene.word_box
            assert s.target_cell == (y // 32) * 3 + x // 32            # 96-px images: 32-px cells
        elif s.task == "vqa" and s.question_type != "count":
            question = s.prompt.split("Question: ")[1].split("\n")[0]
            [target] = [o for o in s.scene.objects if named(o, question)[s.question_type]]
            col, row = POSITION_CELLS[target.position]
            assert s.target_cell == row * 3 + col
        else:
            assert s.target_cell is None
    assert {s.task for s in samples if s.target_cell is not None} == {"vqa", "ocr"}
