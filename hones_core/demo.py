"""The service behind the app: one model, its rankings, and what one request computes.

A request is (image, task inputs, neuron set, budget, factor). The service
1. validates everything a visitor or an API client can send (`DemoInputError` carries the
   message to show; the app turns it into `gr.Error`),
2. runs the base and the steered model in ONE batched pass (per-row plans: row 0 unchanged,
   row 1 with the selected neurons scaled), capturing the FFN activations at the last prompt
   position on the way, so the write-in contributions cost nothing extra; the rows carry the
   same image, so the vision tower runs once for both, and so do the decoder layers before the
   first steered layer (`models.share_rows`, via `VLM.sharing`),
3. caches the base result per (image, task inputs): moving only the slider re-runs only the
   steered row,
4. draws the plots and writes the results JSON.

Model work (`compute`, `compute_sweep`) returns plain data (strings, floats, numpy arrays),
so the app can run it inside a ZeroGPU child process (`spaces.GPU`); caching and drawing
happen in the caller's process (`run`, `sweep`).

Examples (`read_examples`) come from a folder holding `examples.json` (format in
`hones_core.toy.examples`).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import __version__, metrics, plots
from . import rankings as rankings_lib
from .assets import DEFAULT_EXAMPLES, DEFAULT_MODEL, DEFAULT_RANKINGS
from .data import draw_ocr_box
from .errors import (DataFormatError, DemoConfigError, DemoInputError, ModelLoadError, RankingsError,
                     RankingsMismatchError, UnsupportedModelError)
from .interventions import NeuronScale, Plan, intervene
from .models import VLM, Encoded, load_vlm
from .selection import jaccard_matrix, layer_sums
from .tasks import TASKS, caption_prompt, clean_answer, ocr_prompt, retrieval_prompt, vqa_prompt

FACTOR_MIN, FACTOR_MAX = 0.0, 3.0
SWEEP_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
MAX_QUESTION_CHARS = 500
MIN_CANDIDATES, MAX_CANDIDATES, MAX_CANDIDATE_CHARS = 2, 10, 300
MAX_GOLD_CHARS = 500
MIN_SIDE = 16                  # px; smaller images carry nothing a VLM can read
MAX_PIXELS = 50_000_000        # refuse before decoding (decompression bombs)
MAX_SIDE = 2048                # larger images are downscaled before the model sees them
MAX_ASPECT = 20
MAX_FILE_BYTES = 25 * 1024 * 1024
TOP_NEURONS_SHOWN = 12
RANDOM_SEED = 0

PLOTS = ("heads", "layers", "contributions", "layer_sums", "overlap", "sweep")
TASK_TITLES = {"vqa": "VQA", "ocr": "OCR", "caption": "Caption", "retrieval": "Retrieval"}
METHOD_LABELS = {"hones": "HONES", "activation": "activation magnitude (baseline)",
                 "dvp": "DVP without head conditioning (baseline)", "random": "random (same per-layer counts)",
                 "learned": "learned scales"}






# --------------------------------------------------------------------------- inputs


def open_image(source: str | Path | Image.Image | None) -> tuple[Image.Image, list[str]]:
    """An RGB image the model can take, plus warnings to show.

    Reads the header first and refuses oversized images before decoding them.

    Raises:
        DemoInputError: no image, not an image, truncated, too large, too small, or too elongated.
    """
    notes: list[str] = []
    if source is None or (isinstance(source, str) and not source.strip()):
        raise DemoInputError("No image: upload an image or pick one of the examples.")
    if isinstance(source, Image.Image):
        image = source
        _check_size(*image.size)
    else:
        path = Path(source)
        if not path.is_file():
            raise DemoInputError(f"The uploaded file could not be found ({path.name}); upload it again.")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DemoInputError(f"The file is {path.stat().st_size / 2**20:.0f} MB; upload an image under "
                                 f"{MAX_FILE_BYTES // 2**20} MB.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as handle:
                    size = handle.size
                    _check_size(*size)      # before decoding a single pixel
                    handle.load()
                    image = handle.copy()
        except DemoInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # PIL's own limit (header sizes it cannot trust, e.g. frames of an animation)
            raise DemoInputError(f"This image declares more pixels than the app decodes safely (at most "
                                 f"{MAX_PIXELS // 1_000_000} megapixels); downscale it or upload another file.") \
                from err
        except UnidentifiedImageError as err:
            raise DemoInputError("This file is not an image the app can read; upload a PNG, JPEG, WebP or GIF.") \
                from err
        except (OSError, SyntaxError, ValueError) as err:   # truncated / corrupt data (PIL raises all three)
            raise DemoInputError("This image file is damaged or truncated: its pixel data ends early or is "
                                 "corrupt, so it cannot be decoded. Upload it again or use another file.") from err
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        original = image.size
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        notes.append(f"The image was downscaled from {original[0]}×{original[1]} to "
                     f"{image.size[0]}×{image.size[1]} px.")
    return image, notes


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise DemoInputError(f"The image is {width}×{height} px ({width * height / 1e6:.0f} megapixels); the app "
                             f"accepts up to {MAX_PIXELS // 1_000_000} megapixels — downscale it first.")
    if min(width, height) < MIN_SIDE:
        raise DemoInputError(f"The image is only {width}×{height} px; use an image at least "
                             f"{MIN_SIDE}×{MIN_SIDE} px.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise DemoInputError(f"The image is {width}×{height} px, more than {MAX_ASPECT}:1; crop it to a less "
                             f"elongated shape.")


def _text(value, what: str, limit: int, *, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DemoInputError(f"The {what} must be text, got {type(value).__name__}.")
    value = value.strip()
    if required and not value:
        raise DemoInputError(f"The {what} is empty; type one or pick an example.")
    if len(value) > limit:
        raise DemoInputError(f"The {what} has {len(value):,} characters; keep it under {limit}.")
    return value


def parse_bbox(value) -> tuple[float, float, float, float] | None:
    """"x, y, w, h" (text or 4 numbers) or empty -> a COCO box or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        parts = value.replace(",", " ").replace("[", " ").replace("]", " ").split()
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise DemoInputError(f"The box must be 'x, y, w, h', got {value!r}.")
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise DemoInputError(f"The box must be four numbers 'x, y, w, h' in pixels, got {value!r}.") from None
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise DemoInputError(f"The box must be four finite numbers 'x, y, w, h' in pixels, got {value!r}.")
    if numbers[2] <= 0 or numbers[3] <= 0:
        raise DemoInputError(f"The box needs a positive width and height, got {numbers[2]:g} × {numbers[3]:g}.")
    return tuple(numbers)


def parse_candidates(value) -> list[str]:
    """Candidate captions, one per line (or a list), blank lines and duplicates dropped."""
    if value is None:
        value = ""
    lines = value.splitlines() if isinstance(value, str) else list(value)
    candidates = list(dict.fromkeys(str(c).strip() for c in lines if str(c).strip()))
    if len(candidates) < MIN_CANDIDATES:
        raise DemoInputError(f"Retrieval needs at least {MIN_CANDIDATES} different candidate captions, one per "
                             f"line; got {len(candidates)}.")
    if len(candidates) > MAX_CANDIDATES:
        raise DemoInputError(f"Retrieval takes at most {MAX_CANDIDATES} candidates; got {len(candidates)}.")
    for c in candidates:
        if len(c) > MAX_CANDIDATE_CHARS:
            raise DemoInputError(f"A candidate has {len(c):,} characters; keep each under {MAX_CANDIDATE_CHARS}.")
    return candidates


def _number(value, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise DemoInputError(f"The {what} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"The {what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise DemoInputError(f"The {what} must be a finite number, got {value!r}.")
    return number


# --------------------------------------------------------------------------- requests and results


@dataclass(frozen=True)
class Request:
    """One validated request (build it with `DemoService.request`)."""
    task: str
    image: Image.Image = field(repr=False)
    image_key: str
    prompts: tuple[str, ...]          # one per row (retrieval: one per candidate)
    candidates: tuple[str, ...]
    gold: str | None
    factor: float
    budget_pct: float
    method: str
    notes: tuple[str, ...] = ()

    @property
    def base_key(self) -> tuple:
        """What the base result depends on: the image and the task inputs."""
        return (self.task, self.image_key, self.prompts, self.gold)

    @property
    def key(self) -> tuple:
        """Everything the output depends on."""
        return (*self.base_key, self.method, self.budget_pct, self.factor)


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
    """What `DemoService.compute` returns: plain data only (picklable for ZeroGPU)."""
    base: BaseResult
    steered: SteeredResult
    base_cached: bool
    seconds: float


@dataclass
class Output:
    """Everything the app shows for one request."""
    base_answer: list[tuple[str, str | None]]
    steered_answer: list[tuple[str, str | None]]
    summary: str
    table: list[list] | None
    plots: dict[str, tuple[Image.Image, str]]   # PLOTS key -> (image, one-line caption)
    results: dict
    warnings: list[str]


def diff_words(base: str, steered: str) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """Word-level diff for `gr.HighlightedText`: words only in base are "removed", only in steered "added"."""
    a, b = base.split(), steered.split()
    left: list[tuple[str, str | None]] = []
    right: list[tuple[str, str | None]] = []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            left.append((" ".join(a[i0:i1]) + " ", None))
            right.append((" ".join(b[j0:j1]) + " ", None))
            continue
        if i1 > i0:
            left.append((" ".join(a[i0:i1]) + " ", "removed"))
        if j1 > j0:
            right.append((" ".join(b[j0:j1]) + " ", "added"))
    return left or [("(empty answer)", "removed" if b else None)], right or [("(empty answer)",
                                                                             "added" if a else None)]


def read_examples(folder: str | Path = DEFAULT_EXAMPLES) -> dict[str, list[dict]]:
    """Examples by task from `folder/examples.json` (image paths made absolute).

    Raises:
        DataFormatError: the file is malformed or names an image that is missing.
    """
    folder = Path(folder)
    path = folder / "examples.json"
    out: dict[str, list[dict]] = {task: [] for task in TASKS}
    if not path.is_file():
        return out
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected a list of examples")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("task") not in TASKS or not isinstance(entry.get("image"), str):
            raise DataFormatError(f"{path} entry {k}: needs 'task' (one of {', '.join(TASKS)}) and 'image'")
        image = folder / entry["image"]
        if not image.is_file():
            raise DataFormatError(f"{path} entry {k}: image {entry['image']} is missing")
        out[entry["task"]].append({**entry, "image": str(image)})
    return out


# --------------------------------------------------------------------------- the service


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def _at(source: str, revision: str | None) -> str:
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


def _model_source(vlm: VLM) -> dict:
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
    """

    def __init__(self, vlm: VLM, artifact: rankings_lib.Rankings, *, max_new_tokens: int = 24, cache_size: int = 32,
                 rankings_source: dict | None = None):
        rankings_lib.check_against(artifact, vlm.arch, model_id=vlm.name)
        self.vlm, self.artifact, self.max_new_tokens = vlm, artifact, max_new_tokens
        self.base_cache = _LRU(cache_size)
        self.input_cache = _LRU(cache_size)            # processor outputs per (image, prompts[, gold])
        self.sweep_cache = _LRU(cache_size)
        self.output_cache = _LRU(16)                   # whole outputs per request (a repeated action computes once)
        self.figure_cache = _LRU(64)
        self._inflight: dict[tuple, threading.Event] = {}    # request key -> set when its computation ends
        self._inflight_lock = threading.Lock()
        self.readout_cache = _LRU(64)                  # W_down^T u_y per layer, per target
        self.yes_no = vlm.yes_no_ids()
        self._down = [layer.down_proj.weight.detach() for layer in vlm.arch.layers]   # [hidden, intermediate]
        self.sources = {"model": _model_source(vlm),
                        "rankings": rankings_source or artifact.source or {"id": None, "revision": None,
                                                                           "commit": None},
                        "hones_core": __version__}

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, rankings: str = DEFAULT_RANKINGS, *, model_revision: str | None = None,
             rankings_revision: str | None = None, device: str | None = None, dtype: str = "auto") -> DemoService:
        """Load the rankings and the model and check they belong together.

        The rankings load first (they are small), so a missing or unreachable repo is reported
        before the model spends its loading time.

        Raises:
            DemoConfigError: either cannot be loaded, the device does not exist, or the two do not
                match; the message names the model and the rankings.
        """
        pair = f"(model {_at(model, model_revision)}, rankings {_at(rankings, rankings_revision)})"
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
            return cls(vlm, artifact, rankings_source=artifact.source)
        except RankingsMismatchError as err:
            raise DemoConfigError(f"the rankings {_at(rankings, rankings_revision)} do not belong to the model "
                                  f"{_at(model, model_revision)}: {err}") from err

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
        return [(METHOD_LABELS.get(k, f"{k} (baseline)"), k) for k in keys]

    # ----- validation ----------------------------------------------------------------------------
    def request(self, *, task: str, image, question: str | None = None, bbox=None, candidates=None,
                gold: str | None = None, factor=1.0, budget_pct=1.0, method: str = "hones") -> Request:
        """Validate raw inputs into a `Request`.

        Raises:
            DemoInputError: the message to show.
        """
        if task not in TASKS:
            raise DemoInputError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
        if task not in self.artifact.tasks:
            raise DemoInputError(f"Task {task!r} is not available: {self.unavailable()[task]}.")
        factor = _number(factor, "scaling factor")
        if not FACTOR_MIN <= factor <= FACTOR_MAX:
            raise DemoInputError(f"The scaling factor must be between {FACTOR_MIN:g} and {FACTOR_MAX:g} "
                                 f"(1 = unchanged, 0 = masked); got {factor:g}.")
        budget_pct = _number(budget_pct, "neuron budget")
        if not 0 < budget_pct <= 100:
            raise DemoInputError(f"The neuron budget is a percentage of all neurons and must be above 0 and at "
                                 f"most 100; got {budget_pct:g}.")
        keys = [k for _, k in self.methods(task)]
        if method not in keys:
            raise DemoInputError(f"Neuron set {method!r} is not available for {task}; choose one of "
                                 f"{', '.join(keys)}.")
        gold = _text(gold, "gold answer", MAX_GOLD_CHARS, required=False) or None
        picture, notes = open_image(image)
        candidates_out: tuple[str, ...] = ()
        if task == "vqa":
            prompts = (vqa_prompt(_text(question, "question", MAX_QUESTION_CHARS, required=True)),)
        elif task == "ocr":
            box = parse_bbox(bbox)
            if box is not None:
                x, y, w, h = box
                if x >= picture.width or y >= picture.height or x + w <= 0 or y + h <= 0:
                    raise DemoInputError(f"The box {x:g}, {y:g}, {w:g}, {h:g} lies outside the "
                                         f"{picture.width}×{picture.height} image.")
                picture = draw_ocr_box(picture, box)
            prompts = (ocr_prompt(),)
        elif task == "caption":
            prompts = (caption_prompt(),)
        else:
            candidates_out = tuple(parse_candidates(candidates))
            if gold is not None and gold not in candidates_out:
                raise DemoInputError("For retrieval the gold answer must be one of the candidates (the true "
                                     "caption), copied exactly; leave it empty if you do not know it.")
            prompts = tuple(retrieval_prompt(c) for c in candidates_out)
        digest = hashlib.sha256(picture.tobytes() + repr(picture.size).encode()).hexdigest()
        return Request(task=task, image=picture, image_key=digest, prompts=prompts, candidates=candidates_out,
                       gold=gold, factor=factor, budget_pct=budget_pct, method=method, notes=tuple(notes))

    # ----- neurons -----------------------------------------------------------------------------
    def selection(self, task: str, method: str, budget_pct: float) -> dict[int, list[int]]:
        ranking = self.artifact.task(task)
        if method == "learned":
            return ranking.scales.as_selection()
        return ranking.select(method, budget_pct / 100, seed=RANDOM_SEED)

    def plan(self, request: Request, factor: float | None = None) -> Plan:
        """The steered row's plan: the selected neurons times `factor` (learned: times (1 + s) * factor)."""
        factor = request.factor if factor is None else factor
        if request.method == "learned":
            scales = self.artifact.task(request.task).scales
            return Plan(neurons=tuple(NeuronScale(layer, tuple(neurons), tuple(m * factor for m in mult))
                                      for layer, (neurons, mult) in scales.multipliers().items()))
        return Plan.scale_neurons(self.selection(request.task, request.method, request.budget_pct), factor)

    # ----- model work (plain data in and out) ------------------------------------------------------
    def _readouts(self, target: dict[int, float]) -> list[torch.Tensor]:
        """W_down[l]^T u_y for every layer l, `[intermediate]` float32 each, cached per target.

        u_y = normalised sum_t w_t W_U[y_t]; only the target tokens' rows of the unembedding are
        read, and each layer's down projection is multiplied once per target, not per request.
        """
        key = tuple(sorted(target.items()))
        cached = self.readout_cache.get(key)
        if cached is None:
            unembedding = self.vlm.arch.unembedding().detach()
            ids = torch.tensor([t for t, _ in key], device=unembedding.device)
            w = torch.tensor([v for _, v in key], device=unembedding.device, dtype=torch.float32)
            direction = (w[:, None] * unembedding[ids].float()).sum(0)
            direction = direction / direction.norm().clamp_min(1e-12)
            cached = [down.float().T @ direction.to(down.device) for down in self._down]
            self.readout_cache.put(key, cached)
        return cached

    def _contributions(self, z: dict[int, torch.Tensor], row: int, target: dict[int, float]) -> np.ndarray | None:
        """c_{l,i} = z_{l,i} · <W_down[:, i], u_y> of one batch row, `[layers, intermediate]`."""
        if not target:
            return None
        readouts = self._readouts(target)
        rows = [z[layer][row].float() * readouts[layer].to(z[layer].device) for layer in range(len(readouts))]
        return torch.stack([r.cpu() for r in rows]).numpy()

    def _target(self, request: Request, base_answer: str | None, margins: Sequence[float]) -> tuple[dict, str, int]:
        if request.task == "retrieval":
            row = request.candidates.index(request.gold) if request.gold else int(np.argmax(margins))
            which = "the gold caption" if request.gold else "the base model's top candidate"
            return {self.yes_no[0]: 1.0}, f'"Yes" for {which}', row
        answer = request.gold or base_answer or ""
        ids = self.vlm.answer_token_ids(request.prompts[0], answer) if answer else []
        weights: dict[int, float] = {}
        for token in ids:
            weights[token] = weights.get(token, 0.0) + 1.0
        return weights, ("the gold answer" if request.gold else "the base answer"), 0

    @torch.inference_mode()
    def compute(self, request: Request, base: BaseResult | None = None) -> Computed:
        """Run the model: base and steered rows in one batch, or only the steered row when `base` is given."""
        start = time.perf_counter()
        plan = self.plan(request)
        row_plans = ([] if base is not None else [Plan()]) + [plan]
        n_rows = len(row_plans)
        vlm = self.vlm
        if request.task == "retrieval":
            k = len(request.prompts)
            plans = [p for p in row_plans for _ in range(k)]
            inputs = self._inputs(request, n_rows)
            with intervene(vlm.arch, plans, capture="last") as capture, vlm.sharing(len(plans)):
                hidden = vlm.last_hidden(inputs, use_cache=False)
            logits = vlm.unembed(hidden[:, -1:, :])[:, 0, :]
            all_margins = (logits[:, self.yes_no[0]] - logits[:, self.yes_no[1]]).tolist()
            if base is None:
                margins = all_margins[:k]
                target, label, row = self._target(request, None, margins)
                base = BaseResult([], margins, target, label, row, self._contributions(capture.neurons, row, target),
                                  None)
            offset = (n_rows - 1) * k
            steered = SteeredResult([], all_margins[offset:], self._contributions(capture.neurons, offset + base.row,
                                                                                base.target), None)
        else:
            encoded = self._inputs(request, n_rows)
            with intervene(vlm.arch, row_plans, capture="last") as capture, vlm.sharing(n_rows):
                out = vlm.model.generate(**encoded, **vlm.generation_kwargs(self.max_new_tokens))
            new = out[:, encoded["input_ids"].shape[1]:]
            answers = [clean_answer(t, request.task) for t in vlm.tokenizer.batch_decode(new, skip_special_tokens=True)]
            gold_lp = self._gold_logprobs(request, row_plans) if request.gold else None
            if base is None:
                target, label, row = self._target(request, answers[0], [])
                base = BaseResult([answers[0]], [], target, label, 0, self._contributions(capture.neurons, 0, target),
                                  gold_lp[0] if gold_lp else None)
            steered = SteeredResult([answers[-1]], [], self._contributions(capture.neurons, n_rows - 1, base.target),
                                    gold_lp[-1] if gold_lp else None)
            return Computed(base, steered, n_rows == 1, time.perf_counter() - start)
        return Computed(base, steered, n_rows == 1, time.perf_counter() - start)

    def _inputs(self, request: Request, copies: int) -> dict:
        """Processor outputs for `copies` copies of the request's rows (one per prompt).

        One copy is cached per (image, prompts), which a slider move changes neither of, so moving
        the slider does not run the processor again. Families whose processor outputs are not one
        row per prompt (Qwen2-VL / Qwen2.5-VL: patches of all images in one tensor) are processed
        every time.
        """
        vlm, k = self.vlm, len(request.prompts)
        if vlm.arch.family.vision is None:
            return vlm.encode([request.image] * (k * copies), list(request.prompts) * copies).inputs
        key = (request.image_key, request.prompts)
        single = self.input_cache.get(key)
        if single is None:
            single = vlm.encode([request.image] * k, list(request.prompts)).inputs
            if not all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == k for v in single.values()):
                return vlm.encode([request.image] * (k * copies), list(request.prompts) * copies).inputs
            self.input_cache.put(key, single)
        return {name: value.repeat(copies, *[1] * (value.dim() - 1)) for name, value in single.items()}

    def _gold_logprobs(self, request: Request, row_plans: list[Plan]) -> list[float]:
        """Mean log-prob of the gold answer under each row plan; processor outputs cached per input."""
        vlm, n = self.vlm, len(row_plans)
        key = ("gold", request.image_key, request.prompts[0], request.gold)
        single = self.input_cache.get(key)
        if single is None and vlm.arch.family.vision is not None:
            single = vlm.encode([request.image], [request.prompts[0]], [request.gold])
            if all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 1 for v in single.inputs.values()):
                self.input_cache.put(key, single)
            else:
                single = None
        if single is None:      # Qwen2-VL / Qwen2.5-VL: patches of all images in one tensor; process every row
            encoded = vlm.encode([request.image] * n, [request.prompts[0]] * n, [request.gold] * n)
        else:
            encoded = Encoded({k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in single.inputs.items()},
                              single.labels.repeat(n, 1))
        with torch.inference_mode(), intervene(vlm.arch, row_plans), vlm.sharing(n):
            logp, mask = vlm.token_logprobs(encoded)
        return ((logp * mask).sum(-1) / mask.sum(-1)).tolist()

    @torch.inference_mode()
    def compute_sweep(self, request: Request, base: BaseResult, factors: Sequence[float] = SWEEP_FACTORS) -> list[float]:
        """The gold (else base) answer's mean log-prob, or the retrieval margin, under each factor: one batch."""
        plans = [self.plan(request, f) for f in factors]
        n = len(plans)
        if request.task == "retrieval":
            prompt = request.prompts[base.row]
            logits = self.vlm.next_token_logits([request.image] * n, [prompt] * n, plans=plans)
            return (logits[:, self.yes_no[0]] - logits[:, self.yes_no[1]]).tolist()
        answer = request.gold or base.answers[0]
        if not answer:
            return []
        return self.vlm.answer_logprobs([request.image] * n, [request.prompts[0]] * n, [answer] * n, plans=plans,
                                        reduction="mean").tolist()

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
            computed = compute(request)
            base = computed.base
            self.base_cache.put(request.base_key, base)
        key = (request.base_key, request.method, request.budget_pct)
        values = self.sweep_cache.get(key)
        if values is None:
            values = compute_sweep(request, base)
            self.sweep_cache.put(key, values)
        if not values:
            raise DemoInputError("The base answer is empty, so there is no answer whose log-probability to sweep.")
        if request.task == "retrieval":
            ylabel = f"Yes−No margin of {'the gold caption' if request.gold else 'the top base candidate'}"
        else:
            ylabel = f"{'gold' if request.gold else 'base'} answer log-prob (mean per token)"
        plot = plots.strength_sweep(list(SWEEP_FACTORS), values, current=request.factor, ylabel=ylabel)
        return _png(plot), plot.caption, list(SWEEP_FACTORS), values

    # ----- drawing ---------------------------------------------------------------------------------
    def _static_plot(self, key: tuple, make) -> tuple[Image.Image, str]:
        cached = self.figure_cache.get(key)
        if cached is None:
            plot = make()
            cached = (_png(plot), plot.caption)
            self.figure_cache.put(key, cached)
        return cached

    def _all_selections(self, method: str, budget_pct: float) -> tuple[dict, str]:
        usable = all(method in r.methods() for r in self.artifact.tasks.values()) and method != "learned"
        used = method if usable else "hones"
        return {t: self.selection(t, used, budget_pct) for t in self.tasks}, used

    def render(self, request: Request, computed: Computed, *, wall: float) -> Output:
        base, steered = computed.base, computed.steered
        task, ranking = request.task, self.artifact.task(request.task)
        selection = self.selection(task, request.method, request.budget_pct)
        n_selected = sum(len(v) for v in selection.values())
        total = self.vlm.arch.num_layers * self.vlm.arch.intermediate_size
        table = None
        if task == "retrieval":
            base_rank = _ranks(base.margins)
            steered_rank = _ranks(steered.margins)
            order = sorted(range(len(request.candidates)), key=lambda i: base_rank[i])
            table = [[base_rank[i], steered_rank[i], request.candidates[i] + (" ✓" if request.candidates[i] ==
                                                                             request.gold else ""),
                      round(base.margins[i], 3), round(steered.margins[i], 3),
                      round(steered.margins[i] - base.margins[i], 3)] for i in order]
            base_text = request.candidates[int(np.argmax(base.margins))]
            steered_text = request.candidates[int(np.argmax(steered.margins))]
        else:
            base_text, steered_text = base.answers[0], steered.answers[0]
        left, right = diff_words(base_text, steered_text)

        lines = [f"**{METHOD_LABELS.get(request.method, request.method)}**: {n_selected:,} neurons "
                 f"({format_pct(100 * n_selected / total)} % of {total:,}) in layers "
                 f"{', '.join(str(l) for l in selection) or '—'}, scaled ×{request.factor:g}"
                 + (" on top of the learned scales (1 + s)" if request.method == "learned" else "") + "."]
        if request.method == "learned":
            lines[0] += " (The budget does not apply to learned scales.)"
        metric = self._metric(request, base, steered)
        if metric:
            lines.append(metric)
        lines.append("Answers " + ("are identical." if base_text == steered_text else "differ: words only in the "
                                   "base answer are marked red, words only in the steered answer green."))
        lines.append(f"Computed in {computed.seconds:.2f} s"
                     + (" (base answer from the cache: only the steered row ran)." if computed.base_cached else
                        " (base and steered rows in one batch)."))

        figures: dict[str, tuple[Image.Image, str]] = {}
        figures["heads"] = self._static_plot(("heads", task), lambda: plots.head_heatmap(
            ranking.head_scores, ranking.top_heads, task=task))
        selections, used = self._all_selections(request.method, request.budget_pct)
        figures["layers"] = self._static_plot(("layers", used, request.budget_pct), lambda: plots.layer_distribution(
            selections, self.vlm.arch.num_layers))
        if base.contributions is not None and steered.contributions is not None:
            figures.update(self._input_plots(request, ranking, selection, base, steered))
        if len(selections) >= 2:
            def overlap():
                names, matrix = jaccard_matrix(selections)
                return plots.overlap_matrix(names, matrix)
            figures["overlap"] = self._static_plot(("overlap", used, request.budget_pct), overlap)

        results = {
            "model": self.sources["model"], "rankings": {**self.sources["rankings"],
                                                         "for_model": self.artifact.model.describe()},
            "hones_core": self.sources["hones_core"], "task": task,
            "prompts": list(request.prompts), "candidates": list(request.candidates) or None, "gold": request.gold,
            "neuron_set": request.method, "budget_pct": request.budget_pct, "factor": request.factor,
            "selected_neurons": {str(l): v for l, v in selection.items()},
            "base": {"answer": base_text, "margins": base.margins or None, "gold_logprob": base.gold_logprob},
            "steered": {"answer": steered_text, "margins": steered.margins or None,
                        "gold_logprob": steered.gold_logprob},
            "contribution_target": base.target_label,
            "layer_sums": None if base.contributions is None else {
                "base": layer_sums(base.contributions, selection).tolist(),
                "steered": layer_sums(steered.contributions, selection).tolist()},
            "base_cached": computed.base_cached, "compute_s": round(computed.seconds, 4),
            "request_s": round(wall, 4),
        }
        notes = list(request.notes)
        if base.contributions is None:
            notes.append("The base answer is empty, so there is no answer direction for the contribution plots.")
        return Output(left, right, "\n\n".join(lines), table, figures, results, notes)

    def _metric(self, request: Request, base: BaseResult, steered: SteeredResult) -> str:
        if request.gold is None:
            return ""
        task = request.task
        if task == "retrieval":
            positive = request.candidates.index(request.gold)
            b = metrics.ndcg_at_k(base.margins, positive)
            s = metrics.ndcg_at_k(steered.margins, positive)
            return f"NDCG@5 of the gold caption: base **{b:.3f}** → steered **{s:.3f}** (Δ {s - b:+.3f})."
        b_answer, s_answer = base.answers[0], steered.answers[0]
        if task == "vqa":
            name, b, s = "VQA accuracy", metrics.vqa_accuracy(b_answer, [request.gold]), \
                metrics.vqa_accuracy(s_answer, [request.gold])
        elif task == "ocr":
            name, b, s = "ANLS", metrics.anls(b_answer, [request.gold]), metrics.anls(s_answer, [request.gold])
        else:
            name = "sentence BLEU-4"
            b = metrics.corpus_bleu([b_answer], [[request.gold]])
            s = metrics.corpus_bleu([s_answer], [[request.gold]])
        text = f"{name} against the gold answer: base **{b:.3f}** → steered **{s:.3f}**."
        if base.gold_logprob is not None and steered.gold_logprob is not None:
            text += (f" Gold answer log-prob (mean per token): base **{base.gold_logprob:.3f}** → steered "
                     f"**{steered.gold_logprob:.3f}** (Δ {steered.gold_logprob - base.gold_logprob:+.3f}).")
        return text

    def _input_plots(self, request, ranking, selection, base: BaseResult, steered: SteeredResult):
        if request.method in ("random", "learned"):
            pairs = [(l, n) for l, ns in selection.items() for n in ns]
            pairs.sort(key=lambda p: -abs(float(base.contributions[p])))
        else:
            pairs = [(l, n) for l, n, _ in ranking.ranked(request.method, request.budget_pct / 100)]
        pairs = pairs[:TOP_NEURONS_SHOWN]
        labels = [f"L{l}·n{n}" for l, n in pairs]
        b = [float(base.contributions[p]) for p in pairs]
        s = [float(steered.contributions[p]) for p in pairs]
        bar = plots.contributions(labels, b, s, title_hint=f"{base.target_label}")
        sums = plots.layer_sums(layer_sums(base.contributions, selection), layer_sums(steered.contributions, selection))
        return {"contributions": (_png(bar), bar.caption), "layer_sums": (_png(sums), sums.caption)}


def format_pct(value: float) -> str:
    """A percentage for people: 100, 12.5, 1, 0.25, 0.0031 (no exponent notation)."""
    if value >= 10:
        return f"{value:.1f}".removesuffix(".0")
    if value >= 0.01:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def _ranks(scores: Sequence[float]) -> list[int]:
    """1 = highest score; ties share the better rank's order of appearance."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for rank, i in enumerate(order, 1):
        ranks[i] = rank
    return ranks


def _png(plot: plots.Plot, dpi: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    plot.figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def write_results(results: dict, folder: str | Path) -> Path:
    """The results JSON as a file for download (unique name in `folder`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(results, indent=1, ensure_ascii=False)
    path = folder / f"hones-results-{hashlib.sha1(body.encode()).hexdigest()[:12]}.json"
    path.write_text(body + "\n", encoding="utf-8")
    return path


__all__ = ["DemoService", "DemoInputError", "DemoConfigError", "Request", "Output", "open_image", "read_examples",
           "diff_words", "parse_bbox", "parse_candidates", "write_results"]
