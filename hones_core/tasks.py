"""The four tasks: prompts, task items with their gold targets, and answer cleaning.

Prompts are the official ones (DESIGN.md section 3); the chat template is applied by
`models.VLM`. A `TaskItem` carries everything a stage needs: the image, the user prompt,
the gold answers the metric compares with, and the one answer used for teacher forcing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .data import Record, build_retrieval_items, draw_ocr_box

TASKS = ("vqa", "ocr", "caption", "retrieval")


def vqa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer the question with a short phrase."


def ocr_prompt() -> str:
    return "Transcribe the text inside the blue box.\nOutput text only."


def caption_prompt() -> str:
    return "Describe the image in one sentence."


def retrieval_prompt(candidate: str) -> str:
    return f"Candidate: {candidate}\nDoes the candidate correctly describe the image?\nAnswer exactly Yes or No."


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
        return draw_ocr_box(image, self.bbox) if self.task == "ocr" and self.bbox is not None else image

    @property
    def candidate_prompts(self) -> tuple[str, ...]:
        return tuple(retrieval_prompt(c) for c in self.candidates)


_NEEDS = {"vqa": "question", "ocr": "ocr_text", "caption": "captions", "retrieval": "captions"}


def items_for_task(task: str, records: Sequence[Record], *, n_negatives: int = 4, seed: int = 0,
                   limit: int | None = None) -> list[TaskItem]:
    """The task's items from the records that have what it needs (first `limit` of them)."""
    check_task(task)
    usable = [r for r in records if getattr(r, _NEEDS[task])]
    if not usable:
        raise ValueError(f"no record has '{_NEEDS[task]}', so there is nothing to evaluate for task {task!r}")
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
    if task in ("vqa", "ocr") and answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    return answer
