"""Learned steering's training rule, checked against hand-computed values.

The per-epoch examples (retrieval: 1 Yes + 4 random No; caption: a random reference), the
per-item loss average, the cosine schedule, gradient clipping, partial accumulation groups
and the clamp. Most tests replace the model by hand-made per-example losses (`fake`), so the
real training loop runs and every expected number is known in advance.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import hones_core.steering.learn as steering_learn
from hones_core.errors import DataFormatError
from hones_core.steering import SteerConfig, accumulate, learn_scales, neuron_layout, training_examples
from hones_core.tasks import TaskItem, caption_prompt, retrieval_prompt, vqa_prompt

NOWHERE = Path("/nonexistent/img.png")     # no test here loads an image
SIX = {0: [1, 2, 3], 1: [4, 5, 6]}         # 6 scales


def retrieval_item(index: int, candidates: list[str], positive: int) -> TaskItem:
    return TaskItem("retrieval", NOWHERE, retrieval_prompt(candidates[positive]), ("Yes",), "Yes", index,
                    candidates=tuple(candidates), positive=positive)


def vqa_item(index: int, answer: str = "red") -> TaskItem:
    return TaskItem("vqa", NOWHERE, vqa_prompt(f"question {index}?"), (answer,), answer, index)


def pairs(examples) -> list[tuple[str, str]]:
    return [(e.prompt, e.answer) for e in examples]


# --------------------------------------------------------------------------- examples per epoch


def test_retrieval_trains_on_yes_plus_four_random_negatives_drawn_anew_each_epoch():
    candidates = [f"caption number {k}" for k in range(10)]
    item = retrieval_item(0, candidates, positive=3)
    negatives = {retrieval_prompt(c) for k, c in enumerate(candidates) if k != 3}
    draws = []
    for epoch in range(200):
        (examples,) = training_examples([item], epoch=epoch)
        assert len(examples) == 5
        assert pairs(examples)[0] == (retrieval_prompt("caption number 3"), "Yes")
        no = pairs(examples)[1:]
        assert all(answer == "No" for _, answer in no)
        drawn = [prompt for prompt, _ in no]
        assert len(set(drawn)) == 4 and set(drawn) <= negatives      # distinct, never the positive
        draws.append(frozenset(drawn))
    # seeded: the same epoch gives the same draw, another seed another sequence
    assert pairs(training_examples([item], epoch=7)[0]) == pairs(training_examples([item], epoch=7)[0])
    other = [frozenset(p for p, _ in pairs(training_examples([item], epoch=e, cfg=SteerConfig(seed=1))[0])[1:])
             for e in range(200)]
    assert other != draws
    # anew each epoch, uniform over the 9 negatives: each expected 200 * 4 / 9 = 89 times
    assert draws[0] != draws[1] and len(set(draws)) > 50
    counts = Counter(p for d in draws for p in d)
    assert set(counts) == negatives and all(60 <= c <= 120 for c in counts.values())


def test_the_number_of_training_negatives_is_a_setting():
    item = retrieval_item(0, [f"c{k}" for k in range(10)], positive=0)
    (examples,) = training_examples([item], cfg=SteerConfig(train_negatives=2))
    assert [a for _, a in pairs(examples)] == ["Yes", "No", "No"]
    with pytest.raises(ValueError, match="train_negatives"):
        SteerConfig(train_negatives=0)


def test_an_item_with_fewer_negatives_uses_all_it_has_and_one_without_is_refused():
    item = retrieval_item(0, ["pos", "n1", "n2"], positive=0)
    for epoch in range(5):
        (examples,) = training_examples([item], epoch=epoch)
        assert pairs(examples)[0] == (retrieval_prompt("pos"), "Yes")
        assert sorted(pairs(examples)[1:]) == [(retrieval_prompt("n1"), "No"), (retrieval_prompt("n2"), "No")]
    with pytest.raises(DataFormatError, match="no negative"):
        training_examples([retrieval_item(1, ["only"], positive=0)])


def test_caption_trains_on_one_reference_drawn_anew_each_epoch():
    references = ("a red circle", "one red circle", "a circle in red", "red round shape", "the red circle")
    item = TaskItem("caption", NOWHERE, caption_prompt(), references, references[0], 0)
    answers = []
    for epoch in range(40):
        (examples,) = training_examples([item], epoch=epoch)
        assert len(examples) == 1 and examples[0].prompt == caption_prompt()
        answers.append(examples[0].answer)
    assert set(answers) == set(references)           # not always captions[0]; every reference comes up
    assert answers[:5] != [answers[0]] * 5
    assert [training_examples([item], epoch=e)[0][0].answer for e in range(40)] == answers     # seeded


def test_vqa_keeps_its_gold_answer_every_epoch():
    item = TaskItem("vqa", NOWHERE, vqa_prompt("What color?"), ("red", "crimson"), "red", 0)
    assert {training_examples([item], epoch=e)[0][0].answer for e in range(10)} == {"red"}


# --------------------------------------------------------------------------- the training loop, hand-made losses


STUB = SimpleNamespace(name="stub", model=torch.nn.Linear(1, 1))    # learn_scales only freezes and names it


@pytest.fixture
def fake(monkeypatch):
    """Hand-made losses: `fake.loss = f(example, scale)`; `fake.steps` the (lr, grad) of every optimiser step."""
    state = SimpleNamespace(loss=None, steps=[], calls=[])

    def example_loss(vlm, encoded, plan, scale, cfg):
        (example,) = encoded
        state.calls.append(example)
        return state.loss(example, scale), {"ce": 0.0, "kl": 0.0}

    monkeypatch.setattr(steering_learn, "encode_examples", lambda vlm, examples: list(examples))
    monkeypatch.setattr(steering_learn, "example_loss", example_loss)
    monkeypatch.setattr(steering_learn, "example_ces", lambda vlm, examples, plan, batch_size=16: [0.0] * len(examples))

    def record(optimizer, args, kwargs):      # runs after clipping, right before AdamW moves s
        (param,) = optimizer.param_groups[0]["params"]
        state.steps.append((optimizer.param_groups[0]["lr"], param.grad.detach().clone()))
    handle = register_optimizer_step_pre_hook(record)
    yield state
    handle.remove()


def three_retrieval_items() -> tuple[list[TaskItem], dict[str, float]]:
    """Items with 3, 5 and 2 examples and per-example losses whose item means are 3, 4 and 7."""
    items = [retrieval_item(0, ["a-pos", "a1", "a2"], 0),
             retrieval_item(1, ["b1", "b2", "b-pos", "b3", "b4"], 2),
             retrieval_item(2, ["c1", "c-pos"], 1)]
    values = {"a-pos": 1, "a1": 2, "a2": 6, "b-pos": 12, "b1": 2, "b2": 2, "b3": 2, "b4": 2, "c-pos": 5, "c1": 9}
    return items, {retrieval_prompt(c): v for c, v in values.items()}


def test_a_step_loss_is_the_mean_over_items_of_each_items_mean(fake):
    items, value = three_retrieval_items()
    # loss = v * (1 + sum s): v at s = 0, gradient v in every coordinate
    fake.loss = lambda example, scale: value[example.prompt] * (1 + scale.sum())
    by_hand = (3 + 4 + 7) / 3          # per item; per example it would be 43 / 10
    layers, neurons = neuron_layout(SIX)
    scale = torch.zeros(6, requires_grad=True)
    group = training_examples(items)
    assert accumulate(STUB, group, layers, neurons, scale, SteerConfig()) == pytest.approx(by_hand, rel=1e-6)
    torch.testing.assert_close(scale.grad, torch.full((6,), by_hand))
    assert len(fake.calls) == 10       # every example ran, one at a time

    # the same through learn_scales: one group of three items, no clipping in the way
    with pytest.warns(UserWarning, match="2 of 3 retrieval items have fewer than 4 negative"):
        result = learn_scales(STUB, items, SIX, cfg=SteerConfig(accumulation=3, epochs=1, grad_clip=1e9),
                              progress=False)
    assert result.history["train_loss"] == [pytest.approx(by_hand, rel=1e-6)]
    ((_, grad),) = fake.steps
    torch.testing.assert_close(grad, torch.full((6,), by_hand))


def test_the_learning_rate_follows_a_cosine_from_lr_to_a_tenth(fake):
    fake.loss = lambda example, scale: scale.sum()
    items = [vqa_item(i) for i in range(5)]
    learn_scales(STUB, items, SIX, cfg=SteerConfig(lr=0.2, accumulation=1, epochs=1), progress=False)
    lrs = [lr for lr, _ in fake.steps]
    assert len(lrs) == 5
    assert lrs[0] == pytest.approx(0.2) and lrs[2] == pytest.approx(0.11) and lrs[4] == pytest.approx(0.02)
    # lr_k = 0.02 + 0.18 * (1 + cos(pi k / 4)) / 2
    assert lrs[1] == pytest.approx(0.02 + 0.09 * (1 + math.sqrt(0.5)))
    assert lrs[3] == pytest.approx(0.02 + 0.09 * (1 - math.sqrt(0.5)))


def test_the_schedule_runs_over_all_epochs(fake):
    fake.loss = lambda example, scale: scale.sum()
    learn_scales(STUB, [vqa_item(i) for i in range(3)], SIX, cfg=SteerConfig(lr=0.2, accumulation=1, epochs=2),
                 progress=False)
    lrs = [lr for lr, _ in fake.steps]     # 6 steps: cos(pi k / 5)
    assert len(lrs) == 6 and lrs[0] == pytest.approx(0.2) and lrs[-1] == pytest.approx(0.02)
    assert lrs[3] == pytest.approx(0.02 + 0.09 * (1 + math.cos(3 * math.pi / 5)))


def test_gradients_are_clipped_to_norm_one_and_small_ones_are_left_alone(fake):
    fake.loss = lambda example, scale: 100 * scale.sum()      # gradient norm 100 * sqrt(6) = 245
    learn_scales(STUB, [vqa_item(0)], SIX, cfg=SteerConfig(epochs=1), progress=False)
    ((_, grad),) = fake.steps
    assert float(grad.norm()) <= 1.0 and float(grad.norm()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(grad, torch.full((6,), 1 / math.sqrt(6)))     # direction kept
    fake.steps.clear()
    fake.loss = lambda example, scale: 0.01 * scale.sum()     # norm 0.0245: under the limit
    learn_scales(STUB, [vqa_item(0)], SIX, cfg=SteerConfig(epochs=1), progress=False)
    torch.testing.assert_close(fake.steps[0][1], torch.full((6,), 0.01))


def test_a_partial_last_group_is_stepped_and_averaged_over_its_own_items(fake):
    fake.loss = lambda example, scale: 3 * scale.sum()
    items = [vqa_item(i) for i in range(5)]
    result = learn_scales(STUB, items, SIX, cfg=SteerConfig(accumulation=4, epochs=2, grad_clip=1e9),
                          progress=False)
    assert result.history["steps"] == 4 and len(fake.steps) == 4          # 4 + 1 items per epoch, twice
    assert len(fake.calls) == 10 and Counter(e.item.record_index for e in fake.calls) == {i: 2 for i in range(5)}
    for _, grad in fake.steps:         # mean over 4 items, then over 1 (not 3 / 4 for the lone item)
        torch.testing.assert_close(grad, torch.full((6,), 3.0))


def test_a_huge_learning_rate_drives_the_scales_exactly_to_the_clamp(fake):
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    fake.loss = lambda example, scale: (signs * scale).sum()
    result = learn_scales(STUB, [vqa_item(0)], SIX, cfg=SteerConfig(lr=1e3, epochs=1), progress=False)
    assert torch.equal(result.scales.scale, -1.5 * signs)
