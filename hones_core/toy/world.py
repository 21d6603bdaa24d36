"""The synthetic world the toy VLM is trained and evaluated on: seeded splits, their files, the CLI.

What lives where (each module imports only those above it):

    scenes.py    what an image holds (`Scene`, `SceneObject`, `Distractor`, colours, shapes,
                 positions, words, shifts), `generate_scene` and `render`
    annotate.py  its merged-COCO record: `captions`, `make_vqa`, `annotate`, `scene_from_record`,
                 and the words they use (`tokenize`, `vocabulary`)
    world.py     seeded splits and their files: `split_rng`, `iter_split`, `generate_split`,
                 `write_world`, and the `toy-data` CLI `main`

Everything is a deterministic function of (seed, split, shift, image_size): the same call
gives byte-identical JSON and PNGs (with the same Pillow/FreeType build).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from .annotate import annotate
from .scenes import DEFAULT_IMAGE_SIZE, SHIFTS, check_image_size, check_shift, generate_scene, render

# Re-exported because this module held them before scenes.py and annotate.py split off.
from .annotate import NUMBER_WORDS, VQA_TEMPLATES, captions, make_vqa, scene_from_record, tokenize, vocabulary
from .scenes import (BACKGROUND, BOX_FILL, BOX_OUTLINE, COLORS, HELDOUT_COMBOS, OCR_WORDS, POSITION_CELLS,
                    POSITIONS, SHAPES, SIZES, TEXT_COLOR, Distractor, Scene, SceneObject, font_size_for,
                    load_font)

# Seeds every split's RNG and is written into each split's meta, so changing it (even to follow
# a move of this code) changes every image; bump the version only when the output should change.
GENERATOR = "hones_core.toy.world/1"


def split_rng(seed: int, split: str, shift: str = "none") -> random.Random:
    """The RNG of one split: seeded with a string, which (unlike hash()) is not salted."""
    return random.Random(f"{GENERATOR}:{seed}:{split}:{shift}")


def iter_split(n: int, *, seed: int, split: str = "train", image_size: int = DEFAULT_IMAGE_SIZE,
               shift: str = "none", start_id: int = 0
               ) -> Iterator[tuple[Image.Image, dict]]:
    """Yield `n` (image, record) pairs with image ids `start_id .. start_id + n - 1` and
    file names `{image_id:05d}.png`."""
    check_shift(shift)
    check_image_size(image_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = split_rng(seed, split, shift)
    for image_id in range(start_id, start_id + n):
        scene = generate_scene(rng, image_size=image_size, shift=shift)
        record = annotate(scene, rng, image_id=image_id, file_name=f"{image_id:05d}.png")
        yield render(scene), record


def generate_split(n: int, *, seed: int, split: str = "train", image_size: int = DEFAULT_IMAGE_SIZE,
                   shift: str = "none", start_id: int = 0) -> list[tuple[Image.Image, dict]]:
    """`n` (image, record) pairs in memory; see `iter_split`."""
    return list(iter_split(n, seed=seed, split=split, image_size=image_size, shift=shift,
                           start_id=start_id))


# Ids are assigned in this order, so adding a train split never renumbers the eval splits.
SPLITS: tuple[str, ...] = ("discovery", "dev", "test", "train")


def write_world(out_dir: str | Path, *, seed: int, n_discovery: int, n_dev: int, n_test: int,
                n_train: int = 0, image_size: int = DEFAULT_IMAGE_SIZE, shift: str = "none",
                progress: bool = True) -> dict:
    """Write `out_dir/images/*.png` and `{split}.json` for each split (train only when
    `n_train > 0`), each `{"data": [...], "meta": {...}}`. Returns a summary dict."""
    check_shift(shift)
    check_image_size(image_size)
    counts = {"discovery": n_discovery, "dev": n_dev, "test": n_test, "train": n_train}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out_dir": str(out), "images_dir": str(images_dir), "seed": seed,
                     "shift": shift, "image_size": image_size, "splits": {}}
    next_id = 0
    bar = tqdm(total=sum(counts.values()), desc="toy world", unit="img", disable=not progress)
    for split in SPLITS:
        n = counts[split]
        if split == "train" and n == 0:
            continue
        records = []
        for image, record in iter_split(n, seed=seed, split=split, image_size=image_size,
                                        shift=shift, start_id=next_id):
            image.save(images_dir / record["image_info"]["file_name"], format="PNG")
            records.append(record)
            bar.update(1)
        next_id += n
        meta = {"seed": seed, "split": split, "shift": shift, "image_size": image_size,
                "generator": GENERATOR}
        path = out / f"{split}.json"
        path.write_text(json.dumps({"data": records, "meta": meta}) + "\n", encoding="utf-8")
        summary["splits"][split] = {"n": n, "n_ocr": sum("ocr" in r for r in records),
                                    "path": str(path)}
    bar.close()
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: write a toy world and print its summary as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m hones_core toy-data",
                                     description="Write the synthetic toy world.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-discovery", type=int, default=200)
    parser.add_argument("--n-dev", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--n-train", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--shift", choices=SHIFTS, default="none")
    args = parser.parse_args(argv)
    summary = write_world(args.out, seed=args.seed, n_discovery=args.n_discovery,
                          n_dev=args.n_dev, n_test=args.n_test, n_train=args.n_train,
                          image_size=args.image_size, shift=args.shift)
    print(json.dumps(summary))
    return summary


__all__ = [
    "GENERATOR", "SPLITS", "split_rng", "iter_split", "generate_split", "write_world", "main",
    # from scenes and annotate, for compatibility
    "BACKGROUND", "BOX_OUTLINE", "BOX_FILL", "TEXT_COLOR", "COLORS", "SHAPES", "SIZES", "POSITIONS", "POSITION_CELLS",
    "OCR_WORDS", "HELDOUT_COMBOS", "SHIFTS", "DEFAULT_IMAGE_SIZE", "SceneObject", "Distractor", "Scene",
    "font_size_for", "load_font", "generate_scene", "render", "NUMBER_WORDS", "VQA_TEMPLATES", "tokenize",
    "vocabulary", "captions", "make_vqa", "annotate", "scene_from_record",
]


if __name__ == "__main__":
    main()
