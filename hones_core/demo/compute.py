"""The model work of one app request: plans in, plain data out.

`compute` runs the base and the steered row in ONE batched pass (per-row plans: row 0
unchanged, row 1 with the selected neurons scaled), capturing the FFN activations at the last
prompt position on the way, so the write-in contributions cost nothing extra; the rows carry
the same image, so the vision tower runs once for both, and so do the decoder layers before
the first steered layer (`VLM.sharing`). Given a cached base result it runs only the steered
row. Everything returned is plain data (strings, floats, numpy arrays), so the app can run
these functions inside a ZeroGPU child process (`spaces.GPU`).

The formulas are the method's own: answer directions and write-in contributions from
`attribution`, the Yes-No margin from `VLM.yes_no_margins`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .. import attribution
from ..interventions import Plan, intervene
from ..models import VLM, Encoded
from ..tasks import TASKS, clean_answer
from .request import Request

SWEEP_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


class Cache(Protocol):
    """What `compute` needs of a cache (the service passes its bounded, thread-safe LRUs)."""

    def get(self, key: Any) -> Any: ...

    def put(self, key: Any, value: Any) -> None: ...


@dataclass
class Caches:
    """Caches `compute` reads and fills: processor outputs per input, readouts W_downᵀ·u_y per target."""
    inputs: Cache
    readouts: Cache


@dataclass
class BaseResult:
    """The unsteered half of a request, cached per `Request.base_key` (plain data)."""
    answers: list[str]                         # generation: [answer]; retrieval: []
    margins: list[float]                       # retrieval: Yes-No margin per candidate; else []
    target: dict[int, float]                   # token weights of the contribution direction
    target_label: str
    row: int                                   # which row's contributions are shown (retrieval: candidate)
    contributions: np.ndarray | None           # [layers, intermediate]
    gold_logprob: float | None


@dataclass
class SteeredResult:
    answers: list[str]
    margins: list[float]
    contributions: np.ndarray | None
    gold_logprob: float | None


@dataclass
class Computed:
    """What `compute` returns: plain data only (picklable for ZeroGPU)."""
    base: BaseResult
    steered: SteeredResult
    base_cached: bool
    seconds: float


def target(vlm: VLM, request: Request, base_answer: str | None, margins: Sequence[float]
           ) -> tuple[dict[int, float], str, int]:
    """The contribution plots' answer direction: (token weights, label, row whose contributions are shown).

    Retrieval: "Yes" on the gold caption (else the base model's top candidate); otherwise the
    gold answer's tokens (else the base answer's), uniform weights (`attribution.answer_weights`).
    """
    if TASKS[request.task].scoring == "yes/no":
        row = request.candidates.index(request.gold) if request.gold else int(np.argmax(margins))
        which = "the gold caption" if request.gold else "the base model's top candidate"
        return attribution.yes_weights(vlm), f'"Yes" for {which}', row
    answer = request.gold or base_answer or ""
    weights = attribution.answer_weights(vlm, request.prompts[0], answer) if answer else {}
    return weights, ("the gold answer" if request.gold else "the base answer"), 0


def contributions(vlm: VLM, neurons: dict[int, torch.Tensor], row: int, weights: dict[int, float],
                  cache: Cache) -> np.ndarray | None:
    """c_{l,i} = z_{l,i} · <W_down[:, i], u_y> of one batch row, `[layers, intermediate]` (None: no target).

    The readouts W_down[l]ᵀ u_y are cached per target, so each layer's down projection is
    multiplied once per answer direction, not once per request.
    """
    if not weights:
        return None
    key = tuple(sorted(weights.items()))
    layer_readouts = cache.get(key)
    if layer_readouts is None:
        layer_readouts = attribution.readouts(vlm, attribution.direction(vlm.arch.unembedding(), dict(key)))
        cache.put(key, layer_readouts)
    return attribution.contributions(neurons, layer_readouts, row).numpy()


def row_inputs(vlm: VLM, request: Request, copies: int, cache: Cache) -> dict:
    """Processor outputs for `copies` copies of the request's rows (one per prompt).

    One copy is cached per (image, prompts), which a slider move changes neither of, so moving
    the slider does not run the processor again. Families whose processor outputs are not one
    row per prompt (Qwen2-VL / Qwen2.5-VL: patches of all images in one tensor) are processed
    every time.
    """
    k = len(request.prompts)
    if not vlm.arch.batch_first_inputs:
        return vlm.encode([request.image] * (k * copies), list(request.prompts) * copies).inputs
    key = (request.image_key, request.prompts)
    single = cache.get(key)
    if single is None:
        single = vlm.encode([request.image] * k, list(request.prompts)).inputs
        cache.put(key, single)
    return {name: value.repeat(copies, *[1] * (value.dim() - 1)) for name, value in single.items()}


def gold_logprobs(vlm: VLM, request: Request, row_plans: Sequence[Plan], cache: Cache) -> list[float]:
    """Mean log-prob per token of the gold answer under each row plan; processor outputs cached per input."""
    n = len(row_plans)
    if not vlm.arch.batch_first_inputs:
        encoded = vlm.encode([request.image] * n, [request.prompts[0]] * n, [request.gold] * n)
    else:
        key = ("gold", request.image_key, request.prompts[0], request.gold)
        single = cache.get(key)
        if single is None:
            single = vlm.encode([request.image], [request.prompts[0]], [request.gold])
            cache.put(key, single)
        encoded = Encoded({k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in single.inputs.items()},
                          single.labels.repeat(n, 1))
    with torch.inference_mode(), intervene(vlm.arch, list(row_plans)), vlm.sharing(n):
        logp, mask = vlm.token_logprobs(encoded)
    return ((logp * mask).sum(-1) / mask.sum(-1)).tolist()


@torch.inference_mode()
def compute(vlm: VLM, request: Request, plan: Plan, base: BaseResult | None = None, *, caches: Caches,
            max_new_tokens: int = 24) -> Computed:
    """Run the model: base and steered rows in one batch, or only the steered row (`plan`) when `base` is given."""
    start = time.perf_counter()
    row_plans = ([] if base is not None else [Plan()]) + [plan]
    if TASKS[request.task].scoring == "yes/no":
        base, steered = _margins(vlm, request, row_plans, base, caches)
    else:
        base, steered = _answers(vlm, request, row_plans, base, caches, max_new_tokens)
    return Computed(base, steered, len(row_plans) == 1, time.perf_counter() - start)


def _margins(vlm: VLM, request: Request, row_plans: list[Plan], base: BaseResult | None,
             caches: Caches) -> tuple[BaseResult, SteeredResult]:
    """Retrieval: each row plan runs every candidate; margins and the shown row's contributions."""
    k, n_rows = len(request.prompts), len(row_plans)
    plans = [p for p in row_plans for _ in range(k)]
    inputs = row_inputs(vlm, request, n_rows, caches.inputs)
    with intervene(vlm.arch, plans, capture="last") as capture, vlm.sharing(len(plans)):
        hidden = vlm.last_hidden(inputs, use_cache=False)
    all_margins = vlm.yes_no_margins(vlm.unembed(hidden[:, -1:, :])[:, 0, :]).tolist()
    if base is None:
        margins = all_margins[:k]
        weights, label, row = target(vlm, request, None, margins)
        base = BaseResult([], margins, weights, label, row,
                          contributions(vlm, capture.neurons, row, weights, caches.readouts), None)
    offset = (n_rows - 1) * k
    steered = SteeredResult([], all_margins[offset:],
                            contributions(vlm, capture.neurons, offset + base.row, base.target, caches.readouts), None)
    return base, steered


def _answers(vlm: VLM, request: Request, row_plans: list[Plan], base: BaseResult | None, caches: Caches,
             max_new_tokens: int) -> tuple[BaseResult, SteeredResult]:
    """Generation tasks: one greedy answer per row plan, its contributions and the gold log-prob."""
    n_rows = len(row_plans)
    inputs = row_inputs(vlm, request, n_rows, caches.inputs)
    with intervene(vlm.arch, row_plans, capture="last") as capture:
        texts = vlm.generate_from(inputs, max_new_tokens=max_new_tokens)
    answers = [clean_answer(t, request.task) for t in texts]
    gold_lp = gold_logprobs(vlm, request, row_plans, caches.inputs) if request.gold else None
    if base is None:
        weights, label, _ = target(vlm, request, answers[0], [])
        base = BaseResult([answers[0]], [], weights, label, 0,
                          contributions(vlm, capture.neurons, 0, weights, caches.readouts),
                          gold_lp[0] if gold_lp else None)
    steered = SteeredResult([answers[-1]], [],
                            contributions(vlm, capture.neurons, n_rows - 1, base.target, caches.readouts),
                            gold_lp[-1] if gold_lp else None)
    return base, steered


@torch.inference_mode()
def compute_sweep(vlm: VLM, request: Request, base: BaseResult, plans: Sequence[Plan]) -> list[float]:
    """Under each plan (one per sweep factor), in one batch: the retrieval margin of the shown
    candidate, else the gold (else base) answer's mean log-prob per token ([] without an answer)."""
    n = len(plans)
    if TASKS[request.task].scoring == "yes/no":
        prompt = request.prompts[base.row]
        logits = vlm.next_token_logits([request.image] * n, [prompt] * n, plans=list(plans))
        return vlm.yes_no_margins(logits).tolist()
    answer = request.gold or base.answers[0]
    if not answer:
        return []
    return vlm.answer_logprobs([request.image] * n, [request.prompts[0]] * n, [answer] * n, plans=list(plans),
                               reduction="mean").tolist()
