"""The paper's protocol as named presets: every value the official configs set, in one flag.

`--preset paper-llava` / `--preset paper-qwen` fill in what `configs/llava_hones.yaml` /
`configs/qwen_hones.yaml` of the official release set (DESIGN.md section 3); a flag given on
the command line overrides its preset value. What a command ran with (the preset's name and
every resolved value) is recorded in its output: the rankings' `params`, the mask-eval and
steer results.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import HonesError


@dataclass(frozen=True)
class Preset:
    """One protocol.

    Attributes:
        model: the checkpoint the official config runs (for the record; `--model` still decides).
        values: command -> {argparse dest: value}.
    """
    name: str
    model: str
    values: dict[str, dict[str, object]] = field(default_factory=dict)


def _paper(name: str, model: str, top_heads: int) -> Preset:
    shared = {"seed": 3407, "n_negatives": 49}        # 1 positive + 49 negatives, NDCG@5
    return Preset(name, model, {
        "rank": {**shared, "top_heads": top_heads, "top_ratio": 0.01, "limit": 5000, "max_new_tokens": 24},
        "mask-eval": {**shared, "top_ratio": 0.01, "limit": 3000, "max_new_tokens": 24},
        "steer": {**shared, "ratio": 0.01, "dev_limit": 2000, "test_limit": 3000, "epochs": 2, "lr": 5e-4,
                  "train_negatives": 4},
    })


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _paper("paper-llava", "llava-hf/llava-1.5-7b-hf", 30),
    _paper("paper-qwen", "Qwen/Qwen2.5-VL-7B-Instruct", 25),
)}

# The flag of each preset-able value, to tell a value given on the command line from a default.
FLAGS = {"seed": "--seed", "n_negatives": "--n-negatives", "top_heads": "--top-heads", "top_ratio": "--top-ratio",
         "limit": "--limit", "max_new_tokens": "--max-new-tokens", "ratio": "--ratio", "dev_limit": "--dev-limit",
         "test_limit": "--test-limit", "epochs": "--epochs", "lr": "--lr", "train_negatives": "--train-negatives"}


class PresetError(HonesError, ValueError):
    """An unknown preset name."""


def given(argv: Sequence[str], dest: str) -> bool:
    """Whether the flag of `dest` is on the command line (`--flag value` or `--flag=value`)."""
    flag = FLAGS[dest]
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def apply(args: argparse.Namespace, argv: Sequence[str]) -> dict | None:
    """Fill `args` from `args.preset` where the command line did not set a value.

    Returns:
        None without a preset, else `{"name", "model", "values"}`: every value the preset
        covers as it was resolved (command line over preset), for the command's output.

    Raises:
        PresetError: an unknown preset.
    """
    name = getattr(args, "preset", None)
    if not name:
        return None
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    preset = PRESETS[name]
    resolved = {}
    for dest, value in preset.values.get(args.command, {}).items():
        if not given(argv, dest):
            setattr(args, dest, value)
        resolved[dest] = getattr(args, dest)
    return {"name": name, "model": preset.model, "values": resolved}


__all__ = ["Preset", "PRESETS", "PresetError", "apply", "given"]
