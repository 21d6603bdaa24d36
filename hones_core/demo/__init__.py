"""The service behind the app: one model, its rankings, and what one request computes.

- `request`: input limits and checks -> a validated `Request` (`DemoInputError` carries the
  message to show).
- `compute`: the model work of a request on given plans; plain data out (ZeroGPU-safe).
- `render`: summary, retrieval table, figures and results JSON from computed data.
- `service`: `DemoService`, the facade the app calls (caches, selections, plans, run, sweep).
- `examples`: the examples gallery (`read_examples`; `read_gallery` and `gallery_badge` for the
  chosen gallery's per-task counts).
"""

from ..assets import DEFAULT_EXAMPLES, DEFAULT_MODEL, DEFAULT_RANKINGS
from ..errors import DemoConfigError, DemoInputError
from .compute import SWEEP_FACTORS, BaseResult, Computed, SteeredResult
from .examples import Gallery, gallery_badge, read_examples, read_gallery
from .render import METHOD_LABELS, PLOTS, TASK_TITLES, Output, diff_words, format_pct, write_results
from .request import (FACTOR_MAX, FACTOR_MIN, MAX_CANDIDATES, MAX_QUESTION_CHARS, Request, open_image, parse_bbox,
                      parse_candidates)
from .service import DemoService, check_device

__all__ = ["DemoService", "DemoInputError", "DemoConfigError", "Request", "Output", "BaseResult", "SteeredResult",
           "Computed", "open_image", "read_examples", "read_gallery", "gallery_badge", "Gallery", "diff_words",
           "parse_bbox", "parse_candidates",
           "write_results", "check_device", "format_pct", "PLOTS", "TASK_TITLES", "METHOD_LABELS", "SWEEP_FACTORS",
           "FACTOR_MIN", "FACTOR_MAX", "MAX_CANDIDATES", "MAX_QUESTION_CHARS", "DEFAULT_EXAMPLES", "DEFAULT_MODEL",
           "DEFAULT_RANKINGS"]
