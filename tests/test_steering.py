"""Steering: answer-token labels, a frozen backbone, scales that really learn, resuming, the artifact, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import hones_core.steering as steering
import hones_core.steering.learn as steering_learn
import hones_core.steering.run as steering_run
from hones_core import cli, rankings
from hones_core.interventions import Plan
from hones_core.rankings import ModelInfo, Rankings, Scales, TaskRanking
from hones_core.steering import (SteerConfig, SteeringProgressError, encode_examples, example_loss, learn_scales,
                                 neuron_layout, training_examples)
from hones_core.tasks import TaskItem, retrieval_prompt, vqa_prompt

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10), (10, 200, 200), (200, 10, 200)]
ANSWERS = ["red", "green", "blue", "two", "three", "circle"]


def vqa_items(folder: Path, n: int = 4, start: int = 0) -> list[TaskItem]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(start, start + n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (36 + 4 * i, 30), COLOURS[i % len(COLOURS)]).save(path)
        answer = ANSWERS[i % len(ANSWERS)]
        items.append(TaskItem("vqa", path, vqa_prompt("What color is the circle?"), (answer,), answer, i))
    return items


def tiny_ranking(vlm, task: str = "vqa") -> TaskRanking:
    g = torch.Generator().manual_seed(1)
    L, H, I = vlm.arch.num_layers, vlm.arch.num_heads, vlm.arch.intermediate_size
    return TaskRanking(task=task, head_scores=torch.rand(L, H, generator=g), importance=torch.rand(L, I, generator=g),
                       top_heads=[(0, 1), (1, 2)])


SELECTION = {0: [3, 17, 40], 1: [5, 60, 90]}
FAST = SteerConfig(lr=0.05, epochs=3)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3"])
def test_labels_cover_exactly_the_answer_after_the_generation_prompt(family, tiny_vlm, tmp_path):
    vlm = tiny_vlm(family)
    item = vqa_items(tmp_path, 1)[0]
    example = training_examples([item])[0]
    encoded = encode_examples(vlm, [example])
    ids, labels = encoded.inputs["input_ids"][0], encoded.labels[0]
    labelled = labels != -100
    # the labels are one contiguous block at the end: the answer, then the end-of-turn token
    n = int(labelled.sum())
    assert labelled[-n:].all() and not labelled[:-n].any()
    assert torch.equal(labels[labelled], ids[labelled])
    assert vlm.tokenizer.decode(ids[labelled][:-1]).strip() == "red"
    assert ids[-1].item() == vlm.stop_token_id
    # everything before the answer is exactly what generation feeds the model (template, image expansion)
    prompt_only = vlm.encode([item.load_image()], [item.prompt]).inputs
    head = prompt_only["input_ids"][0]
    assert torch.equal(ids[:len(head)], head)
    assert n == len(ids) - len(head)     # labels start right after the generation prompt
    assert torch.equal(encoded.inputs["pixel_values"], prompt_only["pixel_values"])


def test_retrieval_trains_on_yes_for_the_caption_and_no_for_a_negative(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    item = TaskItem("retrieval", path, retrieval_prompt("a red circle"), ("Yes",), "Yes", 0,
                    candidates=("a blue square", "a red circle", "two triangles"), positive=1)
    examples = training_examples([item])
    assert [(e.prompt, e.answer) for e in examples] == [(retrieval_prompt("a red circle"), "Yes"),
                                                        (retrieval_prompt("a blue square"), "No")]


# --------------------------------------------------------------------------- learning


def test_kl_is_zero_at_init_and_the_loss_terms_add_up(tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    encoded = encode_examples(vlm, training_examples(vqa_items(tmp_path, 1)))
    layers, neurons = neuron_layout(SELECTION)
    zero = torch.zeros(len(layers), requires_grad=True)
    loss, parts = example_loss(vlm, encoded, Plan.learned(layers, neurons, zero), zero, SteerConfig())
    assert parts["kl"] == pytest.approx(0.0, abs=1e-7)       # s = 0: the student is the teacher
    assert float(loss.detach()) == pytest.approx(parts["ce"], rel=1e-6)
    s = torch.full((len(layers),), 0.8, requires_grad=True)
    cfg = SteerConfig(beta=0.5, lam=0.1)
    loss, parts = example_loss(vlm, encoded, Plan.learned(layers, neurons, s), s, cfg)
    assert parts["kl"] > 0
    assert float(loss.detach()) == pytest.approx(parts["ce"] + 0.5 * parts["kl"] + 0.1 * 0.64, rel=1e-5)


def test_only_the_scales_learn_they_move_and_dev_loss_goes_down(tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    items = vqa_items(tmp_path, 5)
    # a random tiny model is nearly uniform (CE ~ ln vocab); 48 neurons and a high lr make the drop visible
    wide = {0: list(range(0, 96, 4)), 1: list(range(1, 96, 4))}
    cfg = SteerConfig(lr=0.3, epochs=3)
    vlm.model.zero_grad(set_to_none=True)   # the shared tiny model may carry another test's gradients
    result = learn_scales(vlm, items, wide, cfg=cfg, progress=False)
    assert all(p.grad is None for p in vlm.model.parameters())
    assert all(p.requires_grad for p in vlm.model.parameters())    # flags restored after training
    s = result.scales.scale
    assert s.shape == (48,) and (s != 0).all() and s.abs().max() <= cfg.clamp
    assert result.history["steps"] == cfg.epochs * math.ceil(5 / cfg.accumulation)
    ce = result.history["dev_ce"]
    assert len(ce) == cfg.epochs + 1 and all(a > b for a, b in zip(ce, ce[1:])) and ce[-1] < ce[0] - 5e-3
    assert result.scales.as_selection() == wide
    assert result.scales.meta["lr"] == cfg.lr and result.scales.meta["task"] == "vqa"
    # learned != base on an example, and the stored scales reproduce the learned plan
    images, prompts = [items[0].load_image()], [items[0].prompt]
    base = vlm.next_token_logits(images, prompts)
    steered = vlm.next_token_logits(images, prompts, plans=Plan.multiply_neurons(result.scales.multipliers()))
    assert not torch.allclose(base, steered)
    layers, neurons = neuron_layout(wide)
    torch.testing.assert_close(steered, vlm.next_token_logits(images, prompts,
                                                              plans=Plan.learned(layers, neurons, s)))


def test_paper_settings_take_real_steps(tiny_vlm, tmp_path):
    """The official release never stepped its optimiser; with the paper's settings s must move."""
    vlm = tiny_vlm("llava")
    result = learn_scales(vlm, vqa_items(tmp_path, 4), SELECTION, cfg=SteerConfig(epochs=1), progress=False)
    assert result.history["steps"] == 1
    # one AdamW step moves every coordinate with a gradient by about lr
    assert (result.scales.scale.abs() > 1e-4).sum() >= 4


def test_a_killed_run_resumes_at_the_epoch_boundary(tiny_vlm, tmp_path, monkeypatch):
    vlm = tiny_vlm("llava")
    items = vqa_items(tmp_path / "img", 3)
    whole = learn_scales(vlm, items, SELECTION, cfg=FAST, progress=False)

    class Killed(Exception):
        pass

    original = steering_learn._save_checkpoint

    def dying(path, key, epoch, *args):
        original(path, key, epoch, *args)
        if epoch == 1:
            raise Killed()
    monkeypatch.setattr(steering_learn, "_save_checkpoint", dying)
    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(Killed):
        learn_scales(vlm, items, SELECTION, cfg=FAST, checkpoint=checkpoint, progress=False)
    monkeypatch.setattr(steering_learn, "_save_checkpoint", original)
    with pytest.raises(SteeringProgressError, match="other settings"):
        learn_scales(vlm, items, SELECTION, cfg=SteerConfig(lr=0.01, epochs=3), checkpoint=checkpoint, progress=False)
    resumed = learn_scales(vlm, items, SELECTION, cfg=FAST, checkpoint=checkpoint, progress=False)
    # bitwise: the checkpoint restores the exact state, and the remaining epoch runs the same batches
    assert torch.equal(resumed.scales.scale, whole.scales.scale)
    assert resumed.history == whole.history


def test_scales_round_trip_through_the_rankings_artifact(tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    learned = learn_scales(vlm, vqa_items(tmp_path / "img", 2), SELECTION, cfg=SteerConfig(epochs=1, lr=0.05),
                           meta={"method": "learned"}, progress=False)
    model = ModelInfo.from_arch(vlm.arch, id=vlm.name, revision=None)
    rankings.save(Rankings(model=model, tasks={"vqa": tiny_ranking(vlm)}), tmp_path / "art")
    file = rankings.write_scales(tmp_path / "out" / "vqa" / "scales.safetensors", learned.scales)
    rankings.save_scales(tmp_path / "art", "vqa", rankings.read_scales(file, model))
    loaded = rankings.load(tmp_path / "art").task("vqa").scales
    assert torch.equal(loaded.scale, learned.scales.scale) and torch.equal(loaded.layers, learned.scales.layers)
    assert torch.equal(loaded.neurons, learned.scales.neurons) and loaded.meta == learned.scales.meta
    assert loaded.meta["method"] == "learned" and len(loaded.meta["dev_ce"]) == 2


# --------------------------------------------------------------------------- the command


def write_split(folder: Path, name: str, start: int, n: int) -> Path:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(images / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "What color is the circle?",
                                 "answers": [ANSWERS[i % len(ANSWERS)]]}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def same_scales(a: Scales, b: Scales) -> bool:
    return (torch.equal(a.scale, b.scale) and torch.equal(a.layers, b.layers) and torch.equal(a.neurons, b.neurons)
            and a.meta == b.meta)


def test_cli_steer_end_to_end_resumes_and_fills_the_artifact(tiny_dir, tiny_vlm, tmp_path, capsys, monkeypatch):
    runs: list[steering.TaskRun] = []     # what run_task returned to the CLI
    real_run_task = steering.run_task
    monkeypatch.setattr(steering, "run_task", lambda *a, **k: runs.append(real_run_task(*a, **k)) or runs[-1])
    model_dir = tiny_dir("llava")
    vlm = tiny_vlm("llava")
    art = tmp_path / "art"
    rankings.save(Rankings(model=ModelInfo.from_arch(vlm.arch, id=str(model_dir), revision=None),
                           tasks={"vqa": tiny_ranking(vlm)}), art)
    dev, test = write_split(tmp_path, "dev", 0, 4), write_split(tmp_path, "test", 10, 3)
    out = tmp_path / "out"
    argv = ["steer", "--model", str(model_dir), "--device", "cpu", "--rankings", str(art), "--task", "vqa",
            "--dev", str(dev), "--test", str(test), "--method", "all", "--out", str(out), "--limit", "3",
            "--epochs", "1", "--ratio", "0.03", "--into-rankings"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])["tasks"]["vqa"]
    assert set(summary) == {"metric_name", "n_test", "neurons", "base", *steering.METHODS}
    assert summary["n_test"] == 3 and summary["neurons"] == round(0.03 * 2 * 96)

    doc = json.loads((out / "vqa" / "results.json").read_text())
    for method, result in doc["results"].items():
        assert result["method"] == method and result["n"] == 3 and 0.0 <= result["metric"] <= 1.0
    assert doc["results"]["fixed"]["settings"]["factor"] == 2.0
    grid = doc["results"]["grid"]["settings"]
    assert set(grid["dev_metric"]) == {"0.5", "0.75", "1.0", "1.25", "1.5", "2.0"} and grid["factor"] in steering.GRID
    learned = doc["results"]["learned"]["settings"]
    assert learned["beta"] == 0.05 and doc["results"]["learned-nokl"]["settings"]["beta"] == 0.0
    assert learned["steps"] == 1 and learned["scale"]["abs_mean"] > 0
    assert doc["results"]["random"]["settings"]["selection"] == "random"
    for name in ("scales.safetensors", "scales-learned-nokl.safetensors", "scales-random.safetensors"):
        assert (out / "vqa" / name).is_file()
    assert not list((out / ".progress").glob("*"))
    assert "| vqa | vqa_accuracy | 3 |" in (out / "table.md").read_text()

    in_artifact = rankings.load(art).task("vqa").scales
    from_out = rankings.read_scales(out / "vqa" / "scales.safetensors", rankings.load(art).model)
    assert torch.equal(in_artifact.scale, from_out.scale) and in_artifact.as_selection() == \
        tiny_ranking(vlm).select("hones", 0.03)
    # run_task returned the scales it trained: the very values written to <out> and put into the artifact
    (run,) = runs
    assert run.doc == doc and set(run.trained) == set(steering.LEARNED)
    model = rankings.load(art).model
    for method in steering.LEARNED:
        written = rankings.read_scales(out / doc["results"][method]["settings"]["scales_file"], model)
        assert same_scales(run.trained[method], written)
    assert run.scales("learned") is run.trained["learned"] and same_scales(run.trained["learned"], in_artifact)

    # rerunning the finished command recomputes nothing and prints the same summary
    def fail(*args, **kwargs):
        raise AssertionError("recomputed a finished method")
    monkeypatch.setattr(steering_run, "learn_scales", fail)
    monkeypatch.setattr(steering_run, "evaluate", fail)
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["vqa"] == summary
    # nothing trained this time: the scales come from the first run's files, unchanged
    assert runs[1].trained == {} and same_scales(runs[1].scales("learned"), runs[0].trained["learned"])
    assert same_scales(rankings.load(art).task("vqa").scales, runs[0].trained["learned"])
    with pytest.raises(ValueError, match="learns no scales"):
        runs[1].scales("fixed")
    with pytest.raises(SteeringProgressError, match="other arguments"):
        cli.main([*argv[:-5], "--ratio", "0.05"])


def test_cli_steer_refuses_bad_inputs(tiny_dir, tmp_path):
    model_dir = tiny_dir("llava")
    dev = write_split(tmp_path, "dev", 0, 2)
    common = ["steer", "--model", str(model_dir), "--device", "cpu", "--task", "vqa", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="same file"):
        cli.main([*common, "--rankings", str(tmp_path), "--dev", str(dev), "--test", str(dev)])
    other = write_split(tmp_path, "other", 0, 2)     # same images as dev
    with pytest.raises(ValueError, match="not one"):
        cli.main([*common, "--rankings", "org/name", "--dev", str(dev), "--test", str(other), "--into-rankings"])
    with pytest.raises(rankings.RankingsNotFoundError):
        cli.main([*common, "--rankings", str(tmp_path / "missing"), "--dev", str(dev), "--test", str(other)])


def test_run_task_refuses_overlapping_splits_and_unknown_methods(tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    items = vqa_items(tmp_path, 3)
    with pytest.raises(ValueError, match="share 1 image"):
        steering.run_task(vlm, tiny_ranking(vlm), items[:2], items[1:], ["fixed"], tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="unknown steering method"):
        steering.run_task(vlm, tiny_ranking(vlm), items[:1], items[1:], ["magic"], tmp_path / "o", progress=False)
