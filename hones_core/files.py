"""Writing and reading the files runs leave behind: atomically, as JSON, with content digests.

Artifacts, rank progress and steer runs all go through `atomic_write`, so a reader (or a run
resumed after a kill) sees the old file or the new one, never a part of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import HonesError


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_bytes(obj: Any, *, indent: int | None = 1) -> bytes:
    """`obj` as UTF-8 JSON text with a final newline (non-ASCII kept as is)."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode()


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """`obj` as JSON at `path`, atomically; returns the path."""
    atomic_write(path, json_bytes(obj, indent=indent))
    return Path(path)


def read_json(path: str | Path, *, shown: str | None = None, error: type[HonesError] = HonesError) -> Any:
    """The JSON document at `path`.

    Args:
        shown: how the file is named in messages (default: the path).
        error: the class raised for a missing or malformed file (e.g. `RankingsSchemaError`).

    Raises:
        error: the file is missing, not UTF-8 or not valid JSON.
    """
    path = Path(path)
    shown = shown or str(path)
    if not path.is_file():
        raise error(f"{shown} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{shown} is not valid JSON: {e}") from e


def digest(obj: Any, *, length: int = 16) -> str:
    """A short content digest of a JSON-serialisable value (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


def bytes_digest(data: bytes, *, length: int | None = None) -> str:
    """sha256 of raw bytes, hex (cut to `length` characters when given)."""
    text = hashlib.sha256(data).hexdigest()
    return text if length is None else text[:length]


__all__ = ["atomic_write", "json_bytes", "write_json", "read_json", "digest", "bytes_digest"]
