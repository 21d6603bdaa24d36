"""Steering on tiny models: answer-token labels, the loss against the model's own CE and an independent KL,
a frozen backbone, scales that really learn, resuming (same draws), grid search, Fixed-Amp, the artifact, the CLI.

The training rule itself (examples per epoch, per-item average, schedule, clipping) is in test_steering_learn.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hones_core.steering as steering
import hones_core.steering.learn as steering_learn
import hones_core.steering.run as steering_run
from hones_core import cli, rankings
from hones_core.interventions import Plan, intervene
from hones_core.rankings import ModelInfo, Rankings, Scales, TaskRanking
from hones_core.steering import (SteerConfig, SteeringProgressError, encode_examples, example_loss, learn_scales,
                                 neuron_layout, training_examples)
from hones_core.tasks import TaskItem, caption_prompt, retrieval_prompt, vqa_prompt

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


def caption_items(folder: Path, n: int = 3) -> list[TaskItem]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"cap{i}.png"
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(path)
        refs = tuple(f"a {ANSWERS[i % len(ANSWERS)]} shape number {k}" for k in range(5))
        items.append(TaskItem("caption", path, caption_prompt(), refs, refs[0], i))
    return items


def retrieval_items(folder: Path, n: int = 3) -> list[TaskItem]:
    """Items with 6 candidates each (5 negatives, so the 4 drawn per epoch vary)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"ret{i}.png"
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(path)
        candidates = tuple(f"a {ANSWERS[(i + k) % len(ANSWERS)]} circle" for k in range(6))
        items.append(TaskItem("retrieval", path, retrieval_prompt(candidates[i % 6]), ("Yes",), "Yes", i,
                              candidates=candidates, positive=i % 6))
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
    (example,) = training_examples([item])[0]
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


# --------------------------------------------------------------------------- learning


def test_the_loss_is_the_models_own_ce_plus_beta_kl_plus_lambda_mean_s2(tiny_vlm, tmp_path):
    """Against references computed without example_loss: HF's built-in CE and torch's kl_div."""
    vlm = tiny_vlm("llava")
    encoded = encode_examples(vlm, training_examples(vqa_items(tmp_path, 1))[0])
    wide = {0: list(range(0, 96, 2)), 1: list(range(1, 96, 2))}     # enough neurons for a visible KL
    layers, neurons = neuron_layout(wide)
    labelled = encoded.labels[0, 1:] != -100                       # positions predicting an answer token
    with torch.no_grad():
        base = vlm.model(**encoded.inputs, labels=encoded.labels)   # HF: mean CE over the labelled tokens
    zero = torch.zeros(len(layers), requires_grad=True)
    loss, parts = example_loss(vlm, encoded, Plan.learned(layers, neurons, zero), zero, SteerConfig())
    assert float(loss.detach()) == pytest.approx(float(base.loss), rel=1e-5)     # s = 0: KL 0, penalty 0
    assert parts["kl"] == pytest.approx(0.0, abs=1e-7)

    s = torch.full((len(layers),), 1.5, requires_grad=True)
    with torch.no_grad(), intervene(vlm.arch, Plan.learned(layers, neurons, s)):
        steered = vlm.model(**encoded.inputs, labels=encoded.labels)
    student = torch.log_softmax(steered.logits[0, :-1][labelled].float(), -1)
    teacher = torch.log_softmax(base.logits[0, :-1][labelled].float(), -1)
    kl = float(F.kl_div(student, teacher, log_target=True, reduction="batchmean"))   # KL(teacher || student)
    assert kl > 1e-4
    loss, _ = example_loss(vlm, encoded, Plan.learned(layers, neurons, s), s, SteerConfig(beta=100.0, lam=0.1))
    # 0.1 * mean(1.5^2) = 0.225
    assert float(loss.detach()) == pytest.approx(float(steered.loss) + 100.0 * kl + 0.225, abs=1e-4)
    assert float(steered.loss) != pytest.approx(float(base.loss), abs=1e-3)        # the plan did act


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


def test_a_huge_learning_rate_drives_every_scale_exactly_to_the_clamp(tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    result = learn_scales(vlm, vqa_items(tmp_path, 2), SELECTION, cfg=SteerConfig(lr=1e3, epochs=1), progress=False)
    assert torch.equal(result.scales.scale.abs(), torch.full((6,), 1.5))


ITEMS = {"vqa": vqa_items, "caption": caption_items, "retrieval": retrieval_items}


@pytest.mark.parametrize("task", ["vqa", "caption", "retrieval"])
def test_a_killed_run_resumes_at_the_epoch_boundary_with_the_same_draws(task, tiny_vlm, tmp_path, monkeypatch):
    vlm = tiny_vlm("llava")
    items = ITEMS[task](tmp_path / "img", 3)
    trained: list[list[list[tuple[int, str, str]]]] = []    # per optimiser step, per item: (item, prompt, answer)s
    real_accumulate = steering_learn.accumulate

    def spy(vlm, group, *args, **kwargs):
        trained.append([[(e.item.record_index, e.prompt, e.answer) for e in examples] for examples in group])
        return real_accumulate(vlm, group, *args, **kwargs)
    monkeypatch.setattr(steering_learn, "accumulate", spy)
    whole = learn_scales(vlm, items, SELECTION, cfg=FAST, progress=False)
    whole_trained, trained[:] = list(trained), []
    assert len(whole_trained) == 3              # 3 items, accumulation 4: one step per epoch
    for step in whole_trained:                  # every epoch trains each item once
        assert sorted(ex[0][0] for ex in step) == [0, 1, 2]
    if task == "retrieval":                      # Yes for the positive + 4 No, drawn anew each epoch
        for step in whole_trained:
            assert all(ex[0][1:] == (items[ex[0][0]].prompt, "Yes") for ex in step)
            assert all([a for _, _, a in ex] == ["Yes"] + ["No"] * 4 for ex in step)
        assert whole_trained[0] != whole_trained[1]
    if task == "caption":                        # one of the item's references, not always the first
        drawn = [(index, answer) for step in whole_trained for ex in step for index, _, answer in ex]
        assert all(answer in items[index].targets for index, answer in drawn)
        assert len(set(drawn)) > 3

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
    # the killed run trained epoch 1, the resumed one epochs 2 and 3: the same examples in the same order
    assert trained == whole_trained
    # bitwise: the checkpoint restores the exact state, and the remaining epochs run the same batches
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


# --------------------------------------------------------------------------- grid search and Fixed-Amp


@pytest.mark.parametrize("dev_metric, best", [
    ((0.1, 0.2, 0.3, 0.2, 0.1, 0.9), 2.0),        # a unique best, however far from 1
    ((0.4, 0.3, 0.2, 0.4, 0.1, 0.0), 1.25),       # tie 0.5 / 1.25: the one closer to 1
    ((0.1, 0.2, 0.5, 0.2, 0.1, 0.5), 1.0),        # tie 1 / 2: 1, no change
    ((0.0, 0.6, 0.1, 0.6, 0.1, 0.6), 0.75),       # tie 0.75 / 1.25 / 2: equally close 0.75 and 1.25, the smaller
])
def test_grid_search_takes_the_best_dev_metric_ties_closest_to_one(dev_metric, best, tiny_vlm, tmp_path, monkeypatch):
    seen = []

    def fake_utilities(vlm, items, plans, utility, **kwargs):
        seen.extend(plans)
        return list(dev_metric)
    monkeypatch.setattr(steering_run, "utilities", fake_utilities)
    chosen, by_factor = steering.grid_search(tiny_vlm("llava"), vqa_items(tmp_path, 2), SELECTION, progress=False)
    assert chosen == best
    assert by_factor == dict(zip((0.5, 0.75, 1.0, 1.25, 1.5, 2.0), dev_metric))
    assert [p.neurons for p in seen] == [Plan.scale_neurons(SELECTION, f).neurons for f in by_factor]


def test_fixed_amp_doubles_the_selected_neurons(tiny_vlm, tmp_path, monkeypatch):
    """The plan run_task reports Fixed-Amp with equals doubling W_down's columns of the selected neurons."""
    vlm = tiny_vlm("llava")
    ranking = tiny_ranking(vlm)
    items = vqa_items(tmp_path, 3)
    seen = []      # the plans of each evaluate call

    def fake_evaluate(vlm, items, plans=None, **kwargs):
        seen.append(plans)
        return SimpleNamespace(metric=0.0, n=len(items))
    monkeypatch.setattr(steering_run, "evaluate", fake_evaluate)
    doc = steering.run_task(vlm, ranking, items[:1], items[1:], ["fixed"], tmp_path / "o", ratio=0.1,
                            progress=False).doc
    assert doc["results"]["fixed"]["settings"] == {"factor": 2.0}
    base_plan, fixed_plan = seen         # base first, then Fixed-Amp
    assert base_plan is None
    selection = ranking.select("hones", 0.1)
    images, prompts = [items[0].load_image()], [items[0].prompt]
    base = vlm.next_token_logits(images, prompts)
    fixed = vlm.next_token_logits(images, prompts, plans=fixed_plan)
    weights = {layer: vlm.arch.layers[layer].down_proj.weight for layer in selection}
    saved = {layer: w.detach().clone() for layer, w in weights.items()}
    try:
        with torch.no_grad():
            for layer, neurons in selection.items():
                weights[layer][:, neurons] *= 2.0       # z_i * 2 through W_down is W_down[:, i] * 2
        doubled = vlm.next_token_logits(images, prompts)
    finally:
        with torch.no_grad():
            for layer, w in weights.items():
                w.copy_(saved[layer])
    torch.testing.assert_close(fixed, doubled, rtol=1e-5, atol=1e-5)
    assert (fixed - base).abs().max() > 1e-3
