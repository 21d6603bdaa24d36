"""What a visitor or an API client sends, checked and turned into a `Request`.

Every check raises `DemoInputError` with the message to show (the app turns it into
`gr.Error`); nothing here touches the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data import draw_ocr_box
from ..errors import DemoInputError
from ..files import bytes_digest
from ..tasks import TASKS

FACTOR_MIN, FACTOR_MAX = 0.0, 3.0
MAX_QUESTION_CHARS = 500
MIN_CANDIDATES, MAX_CANDIDATES, MAX_CANDIDATE_CHARS = 2, 10, 300
MAX_GOLD_CHARS = 500
MIN_SIDE = 16                  # px; smaller images carry nothing a VLM can read
MAX_PIXELS = 50_000_000        # refuse before decoding (decompression bombs)
MAX_SIDE = 2048                # larger images are downscaled before the model sees them
MAX_ASPECT = 20
MAX_FILE_BYTES = 25 * 1024 * 1024


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
        check_size(*image.size)
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
                    check_size(*size)      # before decoding a single pixel
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


def check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise DemoInputError(f"The image is {width}×{height} px ({width * height / 1e6:.0f} megapixels); the app "
                             f"accepts up to {MAX_PIXELS // 1_000_000} megapixels — downscale it first.")
    if min(width, height) < MIN_SIDE:
        raise DemoInputError(f"The image is only {width}×{height} px; use an image at least "
                             f"{MIN_SIDE}×{MIN_SIDE} px.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise DemoInputError(f"The image is {width}×{height} px, more than {MAX_ASPECT}:1; crop it to a less "
                             f"elongated shape.")


def text_input(value, what: str, limit: int, *, required: bool) -> str:
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


def number_input(value, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise DemoInputError(f"The {what} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"The {what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise DemoInputError(f"The {what} must be a finite number, got {value!r}.")
    return number


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


def make_request(*, task: str, image, question: str | None = None, bbox=None, candidates=None,
                 gold: str | None = None, factor=1.0, budget_pct=1.0, method: str = "hones",
                 methods: Sequence[str] = ("hones",), unavailable: Mapping[str, str] | None = None) -> Request:
    """Validate raw inputs into a `Request`.

    Args:
        methods: the neuron-set keys offered for `task`.
        unavailable: tasks the rankings lack, with the reason to show.

    Raises:
        DemoInputError: the message to show.
    """
    unavailable = unavailable or {}
    if task not in TASKS:
        raise DemoInputError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task in unavailable:
        raise DemoInputError(f"Task {task!r} is not available: {unavailable[task]}.")
    factor = number_input(factor, "scaling factor")
    if not FACTOR_MIN <= factor <= FACTOR_MAX:
        raise DemoInputError(f"The scaling factor must be between {FACTOR_MIN:g} and {FACTOR_MAX:g} "
                             f"(1 = unchanged, 0 = masked); got {factor:g}.")
    budget_pct = number_input(budget_pct, "neuron budget")
    if not 0 < budget_pct <= 100:
        raise DemoInputError(f"The neuron budget is a percentage of all neurons and must be above 0 and at "
                             f"most 100; got {budget_pct:g}.")
    if method not in methods:
        raise DemoInputError(f"Neuron set {method!r} is not available for {task}; choose one of "
                             f"{', '.join(methods)}.")
    gold = text_input(gold, "gold answer", MAX_GOLD_CHARS, required=False) or None
    picture, notes = open_image(image)
    spec = TASKS[task]
    candidates_out: tuple[str, ...] = ()
    if spec.input == "question":
        prompts = (spec.prompt(text_input(question, "question", MAX_QUESTION_CHARS, required=True)),)
    elif spec.input == "candidates":
        candidates_out = tuple(parse_candidates(candidates))
        if gold is not None and gold not in candidates_out:
            raise DemoInputError("For retrieval the gold answer must be one of the candidates (the true "
                                 "caption), copied exactly; leave it empty if you do not know it.")
        prompts = tuple(spec.prompt(c) for c in candidates_out)
    else:
        if spec.input == "box":
            picture = _with_box(picture, parse_bbox(bbox))
        prompts = (spec.prompt(),)
    digest = bytes_digest(picture.tobytes() + repr(picture.size).encode())
    return Request(task=task, image=picture, image_key=digest, prompts=prompts, candidates=candidates_out,
                   gold=gold, factor=factor, budget_pct=budget_pct, method=method, notes=tuple(notes))


def _with_box(picture: Image.Image, box: tuple[float, float, float, float] | None) -> Image.Image:
    """The image with the OCR box drawn in blue (unchanged without a box)."""
    if box is None:
        return picture
    x, y, w, h = box
    if x >= picture.width or y >= picture.height or x + w <= 0 or y + h <= 0:
        raise DemoInputError(f"The box {x:g}, {y:g}, {w:g}, {h:g} lies outside the "
                             f"{picture.width}×{picture.height} image.")
    return draw_ocr_box(picture, box)
