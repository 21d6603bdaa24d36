"""The four tasks as one table, task items with their gold targets, and answer cleaning.

`TASKS` maps each task name to a `Task` row: its prompt (the official ones, DESIGN.md
section 3; the chat template is applied by `models.VLM`), what the user gives beside the
image, how the model's output is scored, the DVP target rule and the metric. Other modules
read these columns instead of branching on the task name. A `TaskItem` carries everything a
stage needs: the image, the user prompt, the gold answers the metric compares with, and the
one answer used for teacher forcing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .data import Record, build_retrieval_items, draw_ocr_box


N_NEGATIVES = 49     # retrieval: 1 positive + 49 hard negatives per item, the paper's protocol (NDCG@5)


@dataclass(frozen=True)
class Task:
    """One row of the task table.

    Attributes:
        name: "vqa", "ocr", "caption" or "retrieval".
        title: how people read it ("VQA").
        template: the user prompt; `{text}` is the question or the candidate caption.
        input: what the user gives beside the image: "question", "box" (OCR: drawn on the
            image), "candidates" (one prompt per candidate), or None.
        scoring: "generate" (greedy answer, cleaned, scored by the metric) or "yes/no"
            (logit(Yes) - logit(No) of the first answer token, one margin per candidate).
        target: the DVP target u_y: "answer" (the gold answer's tokens, uniform weights),
            "references" (up to 5 reference captions, smoothed-IDF weights) or "yes" (the
            "Yes" token on the positive candidate).
        metric: the `metrics.METRICS` key of the task metric.
        needs: the `data.Record` field an item needs.
        strip_period: `clean_answer` drops one trailing period (short answers, not sentences).
    """
    name: str
    title: str
    template: str
    input: str | None
    scoring: str
    target: str
    metric: str
    needs: str
    strip_period: bool

    def prompt(self, text: str | None = None) -> str:
        """The user prompt, with `text` (question or candidate) filled in where the task takes one."""
        if ("{text}" in self.template) != (text is not None):
            raise ValueError(f"the {self.name} prompt takes {'a text' if '{text}' in self.template else 'no text'}")
        return self.template.format(text=text) if text is not None else self.template


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("vqa", "VQA", "Question: {text}\nAnswer the question with a short phrase.", "question", "generate",
         "answer", "vqa_accuracy", "question", True),
    Task("ocr", "OCR", "Transcribe the text inside the blue box.\nOutput text only.", "box", "generate",
         "answer", "anls", "ocr_text", True),
    Task("caption", "Caption", "Describe the image in one sentence.", None, "generate",
         "references", "bleu4", "captions", False),
    Task("retrieval", "Retrieval", "Candidate: {text}\nDoes the candidate correctly describe the image?\n"
         "Answer exactly Yes or No.", "candidates", "yes/no", "yes", "ndcg@5", "captions", False),
)}


def vqa_prompt(question: str) -> str:
    return TASKS["vqa"].prompt(question)


def ocr_prompt() -> str:
    return TASKS["ocr"].prompt()


def caption_prompt() -> str:
    return TASKS["caption"].prompt()


def retrieval_prompt(candidate: str) -> str:
    return TASKS["retrieval"].prompt(candidate)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class TaskItem:
    """One evaluation/attribution item.

    Attributes:
        prompt: the user turn (for retrieval: the positive candidate's prompt).
        targets: what the metric compares with (VQA annotator answers, OCR text, caption
            references, retrieval ("Yes",)).
        answer: the single gold answer for teacher forcing and log-probabilities.
        bbox: the OCR box, drawn in blue by `load_image`.
        candidates, positive: retrieval candidates and the index of the true caption.
    """
    task: str
    image_path: Path
    prompt: str
    targets: tuple[str, ...]
    answer: str
    record_index: int
    bbox: tuple[float, float, float, float] | None = None
    candidates: tuple[str, ...] = ()
    positive: int | None = None

    def load_image(self) -> Image.Image:
        try:
            with Image.open(self.image_path) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read the image of item {self.record_index}: {self.image_path} ({err})") from err
        return draw_ocr_box(image, self.bbox) if TASKS[self.task].input == "box" and self.bbox is not None \
            else image

    @property
    def candidate_prompts(self) -> tuple[str, ...]:
        return tuple(retrieval_prompt(c) for c in self.candidates)


def items_for_task(task: str, records: Sequence[Record], *, n_negatives: int = N_NEGATIVES, seed: int = 0,
                   limit: int | None = None) -> list[TaskItem]:
    """The task's items from the records that have what it needs (first `limit` of them)."""
    check_task(task)
    needs = TASKS[task].needs
    usable = [r for r in records if getattr(r, needs)]
    if not usable:
        raise ValueError(f"no record has '{needs}', so there is nothing to evaluate for task {task!r}")
    if task == "retrieval":
        items = [TaskItem("retrieval", r.image_path, retrieval_prompt(r.candidates[r.positive]), ("Yes",), "Yes",
                          r.record_index, candidates=r.candidates, positive=r.positive)
                 for r in build_retrieval_items(usable, n_negatives=n_negatives, seed=seed)]
    elif task == "vqa":
        items = [TaskItem("vqa", r.image_path, vqa_prompt(r.question), r.all_answers or (r.answer,), r.answer,
                          r.index) for r in usable]
    elif task == "ocr":
        items = [TaskItem("ocr", r.image_path, ocr_prompt(), (r.ocr_text,), r.ocr_text, r.index, bbox=r.ocr_bbox)
                 for r in usable]
    else:
        items = [TaskItem("caption", r.image_path, caption_prompt(), r.captions[:5], r.captions[0], r.index)
                 for r in usable]
    return items[:limit] if limit is not None else items


_PREFIX = re.compile(r"^\s*(answer|assistant)\s*:\s*", re.IGNORECASE)


def clean_answer(text: str, task: str) -> str:
    """The part of a generation that is scored: first non-empty line, no "Answer:" prefix,
    no surrounding quotes; for VQA and OCR also no single trailing period."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    answer = _PREFIX.sub("", lines[0]) if lines else ""
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "\"'":
        answer = answer[1:-1].strip()
    if TASKS[task].strip_period and answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    return answer
