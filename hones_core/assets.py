"""Paths of what the repository ships: the toy VLM, its rankings and the examples gallery.

Imports nothing heavy, so the app can show its defaults (`python app.py --help`) before
torch and gradio load.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
DEFAULT_MODEL = str(ASSETS / "toy-vlm")
DEFAULT_RANKINGS = str(ASSETS / "rankings" / "toy-vlm")
DEFAULT_EXAMPLES = ASSETS / "examples"

__all__ = ["REPO_ROOT", "ASSETS", "DEFAULT_MODEL", "DEFAULT_RANKINGS", "DEFAULT_EXAMPLES"]
