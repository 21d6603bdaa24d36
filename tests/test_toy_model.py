"""The shipped toy VLM: it loads like a Hub model, really does the four tasks, and training works."""

import json
from pathlib import Path

import pytest

from hones_core.data import read_records
from hones_core.evaluation import evaluate
from hones_core.models import load_vlm
from hones_core.tasks import items_for_task
from hones_core.toy import annotate, world
from hones_core.toy.model import ToyConfig, build_tokenizer
from hones_core.toy.train import TrainConfig, train

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOY = ASSETS / "toy-vlm"
# Regression floors for the shipped model on a 48-image fresh split (sampling noise included).
# They are NOT the quality bar (VQA 0.90, ANLS 0.85, BLEU-4 0.40, NDCG@5 0.90): the shipped
# model reaches it for OCR and captions only; see the README's toy-model table for measured values.
FLOOR = {"vqa": 0.40, "ocr": 0.90, "caption": 0.55, "retrieval": 0.45}


@pytest.fixture(scope="module")
def fresh_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh-world")
    world.write_world(out, seed=9091, n_discovery=1, n_dev=1, n_test=48, image_size=96, progress=False)
    return read_records(out / "test.json")


def test_shipped_model_is_small_and_loads_like_a_hub_model(toy_vlm):
    size = sum(f.stat().st_size for f in TOY.iterdir())
    assert size < 25 * 2**20
    assert (TOY / "model.safetensors").exists() and not list(TOY.glob("*.bin"))
    arch = toy_vlm.arch
    assert arch.family.name == "idefics3"
    assert arch.num_layers >= 4 and arch.num_heads >= 4 and arch.intermediate_size >= 256


@pytest.mark.parametrize("task", ["vqa", "ocr", "caption", "retrieval"])
def test_shipped_model_stays_above_its_floors_on_a_fresh_split(toy_vlm, fresh_split, task):
    items = items_for_task(task, fresh_split, n_negatives=9, seed=0)
    result = evaluate(toy_vlm, items, batch_size=32)
    assert result.n == len(items) > 10
    assert result.metric >= FLOOR[task], f"{task}: {result.metric:.3f} < {FLOOR[task]}"


def test_answers_mean_something(toy_vlm, fresh_split):
    record = next(r for r in fresh_split if r.question and r.question.startswith("How many"))
    answer = toy_vlm.generate([record.image_path], [f"Question: {record.question}\nAnswer the question with a short phrase."])
    assert answer[0].strip(" .") == record.answer


def test_tokenizer_round_trips_world_text():
    tok = build_tokenizer(annotate.vocabulary())
    text = "two shapes: a cyan square and a purple circle, with the word fish."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_training_a_few_steps_lowers_the_loss(tmp_path):
    world.write_world(tmp_path / "w", seed=5, n_discovery=1, n_dev=1, n_test=1, n_train=48, image_size=96,
                      progress=False)
    tiny = ToyConfig(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, intermediate_size=64)
    summary = train(tmp_path / "w" / "train.json", tmp_path / "model", cfg=TrainConfig(epochs=10, batch_size=16, focus_steps=20,
                    lr=3e-3, warmup_steps=2), model_config=tiny, progress=False)
    curve = json.loads((tmp_path / "model" / "training.json").read_text())
    assert summary["steps"] == curve["steps"] > 40   # last_loss averages the last 20 steps
    assert summary["last_loss"] < 0.7 * summary["first_loss"]
    reloaded = load_vlm(tmp_path / "model", device="cpu")
    assert reloaded.arch.num_layers == 1


def test_training_examples_ask_fresh_questions_about_the_recorded_scene(tmp_path):
    from hones_core.models import VLM, load_image
    from hones_core.toy.model import build_toy_vlm
    from hones_core.toy.train import Encoder, _examples, _scenes

    world.write_world(tmp_path / "w", seed=6, n_discovery=1, n_dev=1, n_test=1, n_train=20, image_size=96,
                      progress=False)
    records = read_records(tmp_path / "w" / "train.json")
    scenes = _scenes(tmp_path / "w" / "train.json")
    tiny = ToyConfig(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, intermediate_size=64)
    vlm = VLM(*build_toy_vlm(annotate.vocabulary(), config=tiny), name="tiny")
    encoder = Encoder(vlm, load_image(records[0].image_path))
    index = {r.index: i for i, r in enumerate(records)}

    def possible(scene):
        """Every (question, answer) the world can ask about `scene`, lowercased like the tokenizer."""
        out = set()
        for qtype, target in annotate._vqa_options(scene):
            for template in annotate.VQA_TEMPLATES[qtype]:
                if qtype == "count":
                    out.add((template.lower(), str(len(scene.objects))))
                else:
                    question = template.format(color=target.color, shape=target.shape)
                    answer = {"color": target.color, "shape": target.shape, "position": target.position}[qtype]
                    out.add((question.lower(), answer))
        return out

    def vqa_pairs(seed):
        examples = _examples(records, encoder, index, seed=seed, n_negatives=3, scenes=scenes, vqa_per_image=2)
        pairs = []
        for e in (e for e in examples if e.task == "vqa"):
            text = vlm.tokenizer.decode(e.input_ids)
            question = text.split("question: ")[1].split(" answer the question")[0].strip()
            answer = vlm.tokenizer.decode(e.input_ids[-e.n_labels:-1]).strip()
            pairs.append((e.image, question, answer))
        return pairs

    first, second = vqa_pairs(0), vqa_pairs(1)
    assert len(first) == 2 * len(records)
    assert first != second                      # new questions each epoch
    for image, question, answer in first + second:
        assert (question, answer) in possible(scenes[records[image].index]), (question, answer)
