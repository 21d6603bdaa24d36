"""Share links: a request as URL query parameters, and back.

A link holds the task, the gallery example (by id: its image file's name without the
suffix, e.g. ``example-003``) or nothing for the image, the typed inputs (question, box,
candidates, gold answer) and the neuron set, budget and factor:

    ?task=ocr&example=example-003&method=hones&budget=1&factor=0

An uploaded image cannot travel in a URL; its link carries everything else and says so
(`Link.note`). Opening a link fills the page from it and runs the request; a link with
an unknown task, method or example is answered with a message naming the bad parameter,
never a traceback. Values are checked again by `DemoService.request` like any input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from ..errors import DemoInputError
from ..files import bytes_digest
from ..tasks import TASKS

# query parameter -> the field of `Shared` it fills (the typed inputs, each a text)
TEXT_PARAMS = ("question", "bbox", "candidates", "gold")
INPUT_PARAM = {"question": "question", "box": "bbox", "candidates": "candidates"}   # TASKS[...].input -> parameter
PARAMS = ("task", "example", *TEXT_PARAMS, "method", "budget", "factor")
MAX_PARAM_CHARS = 4000      # more than any valid input (10 candidates of 300 characters)


@dataclass(frozen=True)
class Shared:
    """A request as a link describes it (texts unparsed: the service checks them)."""
    task: str
    example: str | None = None          # example id, or None (no image in the link)
    texts: Mapping[str, str] = field(default_factory=dict)   # question / bbox / candidates / gold
    method: str | None = None
    budget: str | None = None
    factor: str | None = None


@dataclass(frozen=True)
class Link:
    """A share link's query string (starting with "?") and what the visitor should know about it."""
    query: str
    note: str


def example_id(entry: Mapping) -> str:
    """An example's id in links: its image file's name without the suffix."""
    return Path(entry["image"]).stem


class ShareIndex:
    """The examples by id, and which example an image on the page is (by file content)."""

    def __init__(self, examples: Mapping[str, list[dict]]):
        self.by_id: dict[str, tuple[str, dict]] = {}
        self._by_digest: dict[str, list[str]] = {}
        for task, entries in examples.items():
            for entry in entries:
                self.by_id[example_id(entry)] = (task, entry)
                self._by_digest.setdefault(_digest(entry["image"]), []).append(example_id(entry))

    def identify(self, image_path: str | None, task: str) -> str | None:
        """The id of an example whose image file has the same bytes (one of `task`'s first), or None.

        None: an upload, or no image.
        """
        if not image_path or not Path(image_path).is_file():
            return None
        ids = self._by_digest.get(_digest(image_path), [])
        return next((i for i in ids if self.by_id[i][0] == task), ids[0] if ids else None)


def _digest(path: str | Path) -> str:
    return bytes_digest(Path(path).read_bytes())


def make_link(gallery: ShareIndex, *, task: str, image: str | None, texts: Mapping[str, str | None], method: str,
              budget, factor) -> Link:
    """The link reproducing these inputs (only the task's own typed inputs, and the gold answer, when non-empty)."""
    example = gallery.identify(image, task)
    kind = TASKS[task].input if task in TASKS else None
    params: dict[str, str] = {"task": task}
    if example:
        params["example"] = example
    for name in TEXT_PARAMS:
        value = (texts.get(name) or "").strip()
        if value and name in (INPUT_PARAM.get(kind), "gold"):
            params[name] = value
    params.update(method=str(method), budget=f"{float(budget):g}", factor=f"{float(factor):g}")
    if example:
        note = "This link opens the same example with these settings and runs it."
    elif image:
        note = ("The image you uploaded is not in the link (images are not encoded in URLs): whoever opens it gets "
                "these settings and inputs and uploads the image themselves.")
    else:
        note = "No image was chosen: the link carries the settings and inputs only."
    return Link("?" + urlencode(params), note)


def parse_link(params: Mapping[str, str], gallery: ShareIndex, tasks: list[str]) -> Shared | None:
    """The request a link's query parameters describe; None when the URL has none of ours.

    Raises:
        DemoInputError: an unknown parameter value (task, example), naming it and what is allowed.
    """
    ours = {k: str(v) for k, v in params.items() if k in PARAMS}
    if not ours:
        return None
    for name, value in ours.items():
        if len(value) > MAX_PARAM_CHARS:
            raise DemoInputError(f"the link's {name} parameter has {len(value)} characters; at most "
                                 f"{MAX_PARAM_CHARS} are read. The link is damaged: ask for a new one.")
    example = ours.get("example")
    if example is not None and example not in gallery.by_id:
        known = ", ".join(sorted(gallery.by_id)) or "none"
        raise DemoInputError(f"the link names example {example!r}, which this app's gallery does not have "
                             f"(it has: {known}). The link may come from another deployment.")
    task = ours.get("task") or (gallery.by_id[example][0] if example else None)
    if task not in tasks:
        raise DemoInputError(f"the link's task is {task!r}; this app offers {', '.join(tasks)}. "
                             f"Pick a task and an example on the page instead.")
    return Shared(task=task, example=example, texts={k: ours[k] for k in TEXT_PARAMS if k in ours},
                  method=ours.get("method"), budget=ours.get("budget"), factor=ours.get("factor"))


__all__ = ["Shared", "Link", "ShareIndex", "example_id", "make_link", "parse_link", "PARAMS", "TEXT_PARAMS"]
