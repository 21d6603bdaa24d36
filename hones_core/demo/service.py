"""The facade the app calls: one model, its validated rankings, caches, and one request end to end.

`DemoService.run` = validate (`request`) -> neurons and plan (`selection`, `plan`) -> model
work (`compute`, plain data, ZeroGPU-safe) -> drawing (`render`). Caches: the base result per
(image, task inputs), so moving only the slider re-runs only the steered row; processor
outputs and answer-direction readouts; whole outputs per request, with one computation per
request in flight (a typed factor followed by a click is one action, not two).

Views beyond the answers and the six figures (where heads look, a neuron card, per-token
log-probs, ...) are registered with `add_view` and computed only by `view`, i.e. when the page
opens them; `run` never calls them, so a closed view costs a request nothing.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import __version__
from .. import rankings as rankings_lib
from ..assets import DEFAULT_MODEL, DEFAULT_RANKINGS
from ..errors import (DemoConfigError, DemoInputError, ModelLoadError, RankingsError, RankingsMismatchError,
                      UnsupportedModelError)
from ..interventions import Plan
from ..models import VLM, load_vlm
from ..selection import Selection
from ..tasks import TASKS
from . import attention as attention_lib
from . import compute as compute_lib
from . import neuron as neuron_lib
from . import render as render_lib
from . import stored as stored_lib
from . import tokens as tokens_lib
from .compute import SWEEP_FACTORS, BaseResult, Caches, Computed
from .render import Neurons, Output
from .request import Request, make_request

RANDOM_SEED = 0


class LRU:
    """A bounded, thread-safe least-recently-used map."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


def at(source: str, revision: str | None) -> str:
    """`source@revision`, or `source` on the default branch."""
    return f"{source}@{revision}" if revision else str(source)


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything loads.

    Raises:
        DemoConfigError: not a device name, or a CUDA / MPS device that is not there.
    """
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise DemoConfigError(f"HONES_DEVICE={device!r} is not a device name; use cpu, cuda, cuda:1, ... or leave "
                              f"it unset to use CUDA when available.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DemoConfigError(f"HONES_DEVICE={device} asks for a GPU, but this machine has no CUDA device "
                                  f"torch can use; set HONES_DEVICE=cpu (or --device cpu), or leave it unset.")
        if parsed.index is not None and parsed.index >= count:
            raise DemoConfigError(f"HONES_DEVICE={device}: this machine has {count} CUDA device(s), numbered from "
                                  f"0; pick one of cuda:0 … cuda:{count - 1}.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DemoConfigError(f"HONES_DEVICE={device}: MPS is not available here; set HONES_DEVICE=cpu.")


def model_source(vlm: VLM) -> dict:
    """Model id, requested revision and the commit it resolved to (Hub models; None for a local folder)."""
    commit = getattr(vlm.model.config, "_commit_hash", None)
    name = vlm.name
    local = Path(name).expanduser()
    return {"id": str(local.resolve()) if local.exists() else name, "revision": vlm.revision, "commit": commit}


class DemoService:
    """A model, its validated rankings, and the request logic.

    Args:
        vlm: the loaded model.
        artifact: rankings checked against `vlm` (see `load`).
        max_new_tokens: generation length limit.
        cache_size: base results kept (LRU).
        allow_other_model: accept rankings computed for another Hub model of the same shapes
            (e.g. the base of a fine-tune); every result then records which models differ.
    """

    def __init__(self, vlm: VLM, artifact: rankings_lib.Rankings, *, max_new_tokens: int = 24, cache_size: int = 32,
                 rankings_source: dict | None = None, allow_other_model: bool = False):
        self.other_model = rankings_lib.check_against(artifact, vlm.arch, model_id=vlm.name, revision=vlm.revision,
                                                      allow_other_model=allow_other_model)
        self.vlm, self.artifact, self.max_new_tokens = vlm, artifact, max_new_tokens
        self.base_cache = LRU(cache_size)
        self.input_cache = LRU(cache_size)            # processor outputs per (image, prompts[, gold])
        self.sweep_cache = LRU(cache_size)
        self.output_cache = LRU(16)                   # whole outputs per request (a repeated action computes once)
        self.figure_cache = LRU(64)
        self.readout_cache = LRU(64)                  # W_down^T u_y per layer, per target
        self._inflight: dict[tuple, threading.Event] = {}    # request key -> set when its computation ends
        self._inflight_lock = threading.Lock()
        self.sources = {"model": model_source(vlm),
                        "rankings": rankings_source or artifact.source or {"id": None, "revision": None,
                                                                           "commit": None},
                        "hones_core": __version__}

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, rankings: str = DEFAULT_RANKINGS, *, model_revision: str | None = None,
             rankings_revision: str | None = None, device: str | None = None, dtype: str = "auto",
             allow_other_model: bool = False) -> DemoService:
        """Load the rankings and the model and check they belong together.

        The rankings load first (they are small), so a missing or unreachable repo is reported
        before the model spends its loading time.

        Raises:
            DemoConfigError: either cannot be loaded, the device does not exist, or the two do not
                match; the message names the model and the rankings.
        """
        pair = f"(model {at(model, model_revision)}, rankings {at(rankings, rankings_revision)})"
        check_device(device)
        try:
            artifact = rankings_lib.load(rankings, revision=rankings_revision)
        except (RankingsError, ValueError) as err:
            raise DemoConfigError(f"HONES_RANKINGS={rankings} cannot be loaded {pair}: {err}") from err
        try:
            vlm = load_vlm(model, revision=model_revision, device=device, dtype=dtype)
        except (ModelLoadError, UnsupportedModelError) as err:
            raise DemoConfigError(f"HONES_MODEL={model} cannot be loaded {pair}: {err}") from err
        try:
            return cls(vlm, artifact, rankings_source=artifact.source, allow_other_model=allow_other_model)
        except RankingsMismatchError as err:
            raise DemoConfigError(f"the rankings {at(rankings, rankings_revision)} do not belong to the model "
                                  f"{at(model, model_revision)}: {err}") from err

    # ----- what the UI offers -------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.artifact.tasks]

    def unavailable(self) -> dict[str, str]:
        """Tasks the app cannot run, with the reason."""
        return {t: f"the rankings ({self.artifact.model.describe()}) have no {t} task — compute it with "
                   f"`python -m hones_core rank --task {t} ...`" for t in TASKS if t not in self.artifact.tasks}

    def methods(self, task: str) -> list[tuple[str, str]]:
        """(label, key) of the neuron sets offered for `task`."""
        ranking = self.artifact.task(task)
        keys = ranking.methods() + (["learned"] if ranking.scales is not None and len(ranking.scales) else [])
        return [(render_lib.method_label(k), k) for k in keys]

    def request(self, *, task: str, image, question: str | None = None, bbox=None, candidates=None,
                gold: str | None = None, factor=1.0, budget_pct=1.0, method: str = "hones") -> Request:
        """Validate raw inputs into a `Request` (`demo.request.make_request` with this artifact's offer).

        Raises:
            DemoInputError: the message to show.
        """
        unavailable = self.unavailable()
        methods = [k for _, k in self.methods(task)] if task in TASKS and task not in unavailable else []
        return make_request(task=task, image=image, question=question, bbox=bbox, candidates=candidates, gold=gold,
                            factor=factor, budget_pct=budget_pct, method=method, methods=methods,
                            unavailable=unavailable)

    # ----- neurons -----------------------------------------------------------------------------
    def selection(self, task: str, method: str, budget_pct: float) -> Selection:
        ranking = self.artifact.task(task)
        if method == "learned":
            return ranking.scales.as_selection()
        return ranking.select(method, budget_pct / 100, seed=RANDOM_SEED)

    def plan(self, request: Request, factor: float | None = None) -> Plan:
        """The steered row's plan: the selected neurons times `factor` (learned: times (1 + s) * factor)."""
        factor = request.factor if factor is None else factor
        if request.method == "learned":
            return Plan.multiply_neurons(self.artifact.task(request.task).scales.multipliers(), factor)
        return Plan.scale_neurons(self.selection(request.task, request.method, request.budget_pct), factor)

    def neurons(self, request: Request) -> Neurons:
        """The request's neurons, and every task's under the same set (HONES where a task lacks it) and budget."""
        method, budget_pct = request.method, request.budget_pct
        usable = all(method in r.methods() for r in self.artifact.tasks.values()) and method != "learned"
        used = method if usable else "hones"
        shortfall = 0 if method == "learned" else self.artifact.task(request.task).shortfall(method, budget_pct / 100)
        return Neurons(self.selection(request.task, method, budget_pct),
                       {t: self.selection(t, used, budget_pct) for t in self.tasks}, used,
                       self.vlm.arch.num_layers * self.vlm.arch.intermediate_size, shortfall)

    # ----- model work (plain data in and out) ------------------------------------------------------
    def compute(self, request: Request, base: BaseResult | None = None) -> Computed:
        """Run the model: base and steered rows in one batch, or only the steered row when `base` is given."""
        return compute_lib.compute(self.vlm, request, self.plan(request), base,
                                   caches=Caches(self.input_cache, self.readout_cache),
                                   max_new_tokens=self.max_new_tokens)

    def compute_sweep(self, request: Request, base: BaseResult,
                      factors: Sequence[float] = SWEEP_FACTORS) -> list[float]:
        """The gold (else base) answer's mean log-prob, or the retrieval margin, under each factor: one batch."""
        return compute_lib.compute_sweep(self.vlm, request, base, [self.plan(request, f) for f in factors])

    # ----- the request, end to end ------------------------------------------------------------------
    def cached_base(self, request: Request) -> BaseResult | None:
        return self.base_cache.get(request.base_key)

    def run(self, request: Request, *, compute=None) -> Output:
        """Answers, table, plots and results for a request (the sweep plot comes from `sweep`).

        The same request made again (e.g. a factor typed, then Run clicked: two events for one
        action) returns the output already computed, without running the model.

        Args:
            compute: the function that runs the model (default `self.compute`; the app passes a
                `spaces.GPU`-wrapped one on ZeroGPU).
        """
        compute = compute or self.compute
        key = request.key
        while True:
            done = self.output_cache.get(key)
            if done is not None:
                return done
            with self._inflight_lock:
                running = self._inflight.get(key)
                if running is None:
                    mine = self._inflight[key] = threading.Event()
                    break
            running.wait()      # the same request is being computed: take its output (or, if it failed, retry)
        try:
            started = time.perf_counter()
            computed = compute(request, self.cached_base(request))
            self.base_cache.put(request.base_key, computed.base)
            out = self.render(request, computed, wall=time.perf_counter() - started)
            self.output_cache.put(key, out)
            return out
        finally:
            with self._inflight_lock:
                self._inflight.pop(key, None)
            mine.set()

    def render(self, request: Request, computed: Computed, *, wall: float) -> Output:
        sources = {**self.sources, "rankings": {**self.sources["rankings"],
                                                "for_model": self.artifact.model.describe(),
                                                "other_model": self.other_model}}
        return render_lib.render(request, computed, self.artifact.task(request.task), self.neurons(request),
                                 num_layers=self.vlm.arch.num_layers, sources=sources,
                                 figure_cache=self.figure_cache, wall=wall)

    def sweep(self, request: Request, *, compute=None,
              compute_sweep=None) -> tuple[Image.Image, str, list[float], list[float]]:
        """The strength-sweep plot (cached per input, neuron set and budget): (image, caption, factors, values).

        Args:
            compute, compute_sweep: the functions that run the model (default the service's own; on
                ZeroGPU the app passes `spaces.GPU`-wrapped ones, so every model call runs inside them).
        """
        compute = compute or self.compute
        compute_sweep = compute_sweep or self.compute_sweep
        base = self.cached_base(request)
        if base is None:
            base = compute(request).base
            self.base_cache.put(request.base_key, base)
        key = (request.base_key, request.method, request.budget_pct)
        values = self.sweep_cache.get(key)
        if values is None:
            values = compute_sweep(request, base)
            self.sweep_cache.put(key, values)
        if not values:
            raise DemoInputError("The base answer is empty, so there is no answer whose log-probability to sweep.")
        image, caption = render_lib.sweep_figure(request, values)
        return image, caption, list(SWEEP_FACTORS), values

    # ----- the stored evaluation (depends on the artifact only; drawn once) -------------------------
    def evidence_line(self, task: str, method: str, budget_pct: float) -> str:
        """What the stored held-out evaluation says about this neuron set at this budget (one markdown line)."""
        return stored_lib.evidence_line(stored_lib.stored(self.artifact.evaluation, task), method, budget_pct)

    def evidence_figures(self, task: str) -> dict[str, tuple[Image.Image, str] | None]:
        """The stored budget curve of `task` and the HONES cross-ablation matrix, as (image, caption) or None."""
        view = stored_lib.stored(self.artifact.evaluation, task)
        out: dict[str, tuple[Image.Image, str] | None] = {"budget": None, "cross": None}
        if view is None:
            return out
        for name, key, make in (("budget", ("stored-budget", task), stored_lib.budget_figure),
                                ("cross", ("stored-cross",), stored_lib.cross_figure)):
            drawn = self.figure_cache.get(key)
            if drawn is None:
                plot = make(view)
                drawn = stored_lib.as_image(plot) if plot is not None else None
                if drawn is not None:
                    self.figure_cache.put(key, drawn)
            out[name] = drawn
        return out

    # ----- views computed only when opened (each runs inside the app's GPU wrapper) ----------------
    def computed(self, request: Request) -> Computed:
        """The request's base and steered results (the base from the cache when there; the steered row re-run)."""
        done = self.compute(request, self.cached_base(request))
        self.base_cache.put(request.base_key, done.base)
        return done

    def head_choices(self, task: str, k: int = 8) -> list[tuple[str, str]]:
        """(label, value) of the task's top heads, best first, for the head selector."""
        return [(f"L{layer}·H{head} (#{i + 1})", f"{layer}, {head}")
                for i, (layer, head) in enumerate(self.artifact.task(task).top_heads[:k])]

    def head_view(self, request: Request, head: str | None = None) -> tuple[Image.Image, str]:
        """Where one head looks (the task's best head unless `head`, "layer, head", is given): base | steered.

        Raises:
            DemoInputError: `head` is not a layer and a head number of this model.
        """
        if head in (None, ""):
            heads = self.artifact.task(request.task).top_heads[:1]
        else:
            numbers = [int(n) for n in re.findall(r"\d+", str(head))]
            if len(numbers) != 2:
                raise DemoInputError(f'Give a head as its layer and index, e.g. "L2·H3" or "2, 3"; got {head!r}.')
            heads = [tuple(numbers)]
        prompt = 0
        if TASKS[request.task].scoring == "yes/no":    # the candidate whose contributions the page shows
            prompt = (self.cached_base(request) or self.computed(request).base).row
        found = attention_lib.head_attention(self.vlm, request, heads=heads, plans=[Plan(), self.plan(request)],
                                             prompt_index=prompt)
        return attention_lib.figure(found, request.image)

    def neuron_view(self, request: Request, neuron: str | None = None) -> tuple[str, str]:
        """The card of a neuron ("L3·n120" or "3, 120"; None: the first the top-contributions plot lists).

        Returns:
            (the card as markdown, the neuron shown as "L3·n120").

        Raises:
            DemoInputError: not a neuron of this model, or an empty base answer.
        """
        base = self.cached_base(request) or self.computed(request).base
        if neuron in (None, ""):
            shown = self.neuron_choices(request)
            if not shown:
                raise DemoInputError("This request selects no neuron to show: type one, e.g. L2·n17.")
            neuron = shown[0]
        layer, index = neuron_lib.neurons_of(neuron)
        card = neuron_lib.neuron_card(self.vlm, request, self.artifact, base, self.plan(request), layer=layer,
                                      neuron=index)
        return neuron_lib.card_markdown(card, method_label=render_lib.method_label), render_lib.neuron_label(
            card.layer, card.neuron)

    def tokens_view(self, request: Request) -> str:
        """Both answers token by token with their log-probs under the base and the steered row, as markdown."""
        done = self.computed(request)
        return tokens_lib.tokens_markdown(tokens_lib.answer_tokens(self.vlm, request, done.base, done.steered,
                                                                   self.plan(request)))

    def neuron_choices(self, request: Request) -> list[str]:
        """The neurons the top-contributions plot lists for this request ("L3·n120"), in its order; [] before a run."""
        base = self.cached_base(request)
        if base is None or base.contributions is None:
            return []
        selection = self.selection(request.task, request.method, request.budget_pct)
        pairs = render_lib.shown_neurons(request, self.artifact.task(request.task), selection, base)
        return [render_lib.neuron_label(layer, n) for layer, n in pairs]
