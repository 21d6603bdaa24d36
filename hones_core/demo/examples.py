"""The examples gallery: a folder holding `examples.json` (format in `hones_core.toy.examples`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..assets import DEFAULT_EXAMPLES
from ..errors import DataFormatError
from ..tasks import TASKS


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
