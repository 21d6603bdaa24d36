"""Running a VLM on task items and scoring it with the task's metric.

VQA, OCR and captioning decode greedily (at most 24 new tokens) and score the cleaned
answers; retrieval scores every candidate caption by logit(Yes) - logit(No) of the first
answer token and reports NDCG@5 of the positive. Every call takes an optional
intervention plan, one for all rows or one per item, which is what head localization
and masking evaluation build on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import metrics
from .interventions import Plan
from .models import VLM
from .tasks import TASKS, TaskItem, check_task, clean_answer

MAX_NEW_TOKENS = 24


@dataclass
class TaskResult:
    task: str
    metric_name: str
    metric: float
    n: int
    predictions: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {"task": self.task, "metric_name": self.metric_name, "metric": self.metric, "n": self.n}


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _row_plans(plans: Plan | Sequence[Plan | None] | None, rows: Sequence[int]):
    if plans is None or isinstance(plans, Plan):
        return plans
    return _flatten([plans[i] for i in rows])


def _grouped(items: Sequence[TaskItem]) -> list[int]:
    """Item indices in an order that puts repeats of one item (the same object) next to each other.

    Callers such as head localization pass (item, plan) rows plan by plan; run in this order,
    a batch holds each item under several plans, so its image is processed once, the vision
    tower runs once for it (`sharing.share_images`) and the decoder layers before the first
    layer where the plans differ run once (`sharing.share_prefix`). Each row's result does not
    depend on the order.
    """
    first: dict[int, int] = {}
    return sorted(range(len(items)), key=lambda i: (first.setdefault(id(items[i]), i), i))


class _Images:
    """Each item's image, loaded once per call however many rows repeat the item."""

    def __init__(self, items: Sequence[TaskItem]):
        self.items = items
        self.loaded: dict[int, object] = {}

    def __getitem__(self, i: int):
        key = id(self.items[i])
        if key not in self.loaded:
            self.loaded[key] = self.items[i].load_image()
        return self.loaded[key]


def predict(vlm: VLM, items: Sequence[TaskItem], *, plans: Plan | Sequence[Plan | None] | None = None,
            batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> list:
    """Model outputs for `items` (all of one task): cleaned answers, or candidate scores for retrieval.

    Args:
        plans: one plan for every item, or one per item (same order as `items`). `items` may
            repeat an item (one row per (item, plan)): repeats share their image and batch.
    """
    if not items:
        raise ValueError("no items to evaluate")
    task = check_task(items[0].task)
    if any(item.task != task for item in items):
        raise ValueError("predict takes items of one task at a time")
    if plans is not None and not isinstance(plans, Plan) and len(plans) != len(items):
        raise ValueError(f"{len(plans)} plans for {len(items)} items")
    bar = tqdm(total=len(items), desc=f"{task}", disable=not progress, leave=False)
    outputs: list = [None] * len(items)
    order = _grouped(items)
    images = _Images(items)
    if TASKS[task].scoring == "yes/no":
        for chunk in _chunks(len(items), max(1, batch_size // 4)):
            rows = [order[j] for j in chunk]
            row_images, prompts, row_plans, owners = [], [], [], []
            for i in rows:
                for prompt in items[i].candidate_prompts:
                    row_images.append(images[i])
                    prompts.append(prompt)
                    owners.append(i)
                    row_plans.append(plans if plans is None or isinstance(plans, Plan) else plans[i])
            logits = vlm.next_token_logits(row_images, prompts, plans=_flatten(row_plans))
            margin = vlm.yes_no_margins(logits).tolist()
            for i in rows:
                outputs[i] = [m for m, owner in zip(margin, owners) if owner == i]
            bar.update(len(rows))
    else:
        for chunk in _chunks(len(items), batch_size):
            rows = [order[j] for j in chunk]
            answers = vlm.generate([images[i] for i in rows], [items[i].prompt for i in rows],
                                   max_new_tokens=max_new_tokens, plans=_row_plans(plans, rows))
            for i, answer in zip(rows, answers):
                outputs[i] = clean_answer(answer, task)
            bar.update(len(rows))
    bar.close()
    return outputs


def _flatten(row_plans: list):
    """One shared plan stays shared (cheaper); otherwise one plan per row."""
    first = row_plans[0]
    if all(p is first for p in row_plans):
        return first
    return row_plans


def references(items: Sequence[TaskItem]) -> list:
    """What `metrics.aggregate` compares predictions with, per item."""
    return [item.positive if TASKS[item.task].scoring == "yes/no" else list(item.targets) for item in items]


def evaluate(vlm: VLM, items: Sequence[TaskItem], *, plans: Plan | Sequence[Plan | None] | None = None,
             batch_size: int = 16, progress: bool = False) -> TaskResult:
    """The task metric of `vlm` (under `plans`) on `items`."""
    predictions = predict(vlm, items, plans=plans, batch_size=batch_size, progress=progress)
    task = items[0].task
    metric = TASKS[task].metric
    score = metrics.aggregate(metric, predictions, references(items))
    return TaskResult(task, metric, float(score), len(items), predictions)


@torch.inference_mode()
def gold_logprob(vlm: VLM, items: Sequence[TaskItem], *, plans: Plan | Sequence[Plan | None] | None = None,
                 batch_size: int = 16) -> torch.Tensor:
    """Teacher-forced mean log-probability per answer token of each item's gold answer, `[n]`.

    Repeats of an item (rows (item, plan)) are batched together, like in `predict`.
    """
    if plans is not None and not isinstance(plans, Plan) and len(plans) != len(items):
        raise ValueError(f"{len(plans)} plans for {len(items)} items")
    out = torch.empty(len(items))
    order = _grouped(items)
    images = _Images(items)
    for chunk in _chunks(len(items), batch_size):
        rows = [order[j] for j in chunk]
        values = vlm.answer_logprobs([images[i] for i in rows], [items[i].prompt for i in rows],
                                     [items[i].answer for i in rows], plans=_row_plans(plans, rows),
                                     reduction="mean")
        out[rows] = values.to(out.dtype).cpu()
    return out
