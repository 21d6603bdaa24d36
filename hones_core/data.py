"""Dataset readers: the official release's merged-COCO JSON and a JSONL format, OCR boxes,
and retrieval items with hard negatives.

Merged-COCO JSON (the official release's format; our synthetic world writes it too):

    {"data": [{"image_id"?, "image_info": {"file_name", ...},
               "vqa"?: {"question", "answer", "all_answers": [...]},
               "ocr"?: {"text", "bbox": [x, y, w, h]},
               "captions"?: [{"caption"}, ...]}, ...]}

Each section is optional per record, but a present section must be well-formed. The gold
VQA answers are `all_answers` (the official code reads keys the data does not have and
silently degrades; we do not). The official files' absolute `image_path` points to the
authors' machine and is ignored: images are looked up by `file_name` in `--images`, else in
an `images/` folder next to the data file, else next to it.

JSONL (one object per line, blank lines skipped):

    {"image": "file.png", "question"?, "answers"?: ["first is the answer", ...],
     "ocr_text"?, "ocr_bbox"?: [x, y, w, h], "captions"?: ["...", ...]}
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import DataFormatError




@dataclass(frozen=True)
class Record:
    index: int
    image_id: str
    image_path: Path
    question: str | None = None
    answer: str | None = None
    all_answers: tuple[str, ...] = ()
    ocr_text: str | None = None
    ocr_bbox: tuple[float, float, float, float] | None = None   # COCO [x, y, w, h] in pixels
    captions: tuple[str, ...] = ()


def _image_root(path: Path, images_dir: str | Path | None) -> Path:
    if images_dir is not None:
        return Path(images_dir)
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{where}: '{field}' must be a non-empty string, got {value!r}")
    return value.strip()


def _bbox(value, where: str) -> tuple[float, float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
        raise DataFormatError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {value!r}")
    return tuple(float(v) for v in value)


def read_merged_coco(path: str | Path, images_dir: str | Path | None = None) -> list[Record]:
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise DataFormatError(f"{path}: expected an object with a 'data' list (the merged-COCO format)")
    root = _image_root(path, images_dir)
    records = []
    for index, item in enumerate(content["data"]):
        where = f"{path} record {index}"
        info = item.get("image_info") if isinstance(item, dict) else None
        if not isinstance(info, dict):
            raise DataFormatError(f"{where}: missing 'image_info' with a 'file_name'")
        file_name = _text(info.get("file_name"), where, "image_info.file_name")
        fields: dict = {}
        if "vqa" in item:
            vqa = item["vqa"]
            fields["question"] = _text(vqa.get("question"), where, "vqa.question")
            fields["answer"] = _text(vqa.get("answer"), where, "vqa.answer")
            answers = vqa.get("all_answers", [fields["answer"]])
            if not isinstance(answers, list) or not answers:
                raise DataFormatError(f"{where}: 'vqa.all_answers' must be a non-empty list")
            fields["all_answers"] = tuple(_text(a, where, "vqa.all_answers[]") for a in answers)
        if "ocr" in item:
            fields["ocr_text"] = _text(item["ocr"].get("text"), where, "ocr.text")
            if item["ocr"].get("bbox") is not None:
                fields["ocr_bbox"] = _bbox(item["ocr"]["bbox"], where)
        if "captions" in item:
            caps = item["captions"]
            if not isinstance(caps, list):
                raise DataFormatError(f"{where}: 'captions' must be a list of {{'caption': ...}}")
            fields["captions"] = tuple(_text(c.get("caption") if isinstance(c, dict) else None, where,
                                             "captions[].caption") for c in caps)
        records.append(Record(index, str(item.get("image_id", file_name)), root / file_name, **fields))
    return records


def read_jsonl(path: str | Path, images_dir: str | Path | None = None) -> list[Record]:
    path = Path(path)
    root = _image_root(path, images_dir)
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected a JSON object")
        image = _text(item.get("image"), where, "image")
        fields: dict = {}
        if "question" in item:
            fields["question"] = _text(item["question"], where, "question")
            answers = item.get("answers")
            if not isinstance(answers, list) or not answers:
                raise DataFormatError(f"{where}: a question needs a non-empty 'answers' list")
            fields["all_answers"] = tuple(_text(a, where, "answers[]") for a in answers)
            fields["answer"] = fields["all_answers"][0]
        if "ocr_text" in item:
            fields["ocr_text"] = _text(item["ocr_text"], where, "ocr_text")
            if item.get("ocr_bbox") is not None:
                fields["ocr_bbox"] = _bbox(item["ocr_bbox"], where)
        if "captions" in item:
            if not isinstance(item["captions"], list):
                raise DataFormatError(f"{where}: 'captions' must be a list of strings")
            fields["captions"] = tuple(_text(c, where, "captions[]") for c in item["captions"])
        records.append(Record(len(records), image, root / image, **fields))
    return records


def read_records(path: str | Path, images_dir: str | Path | None = None) -> list[Record]:
    """Records of a .json (merged-COCO) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".json":
        return read_merged_coco(path, images_dir)
    if path.suffix == ".jsonl":
        return read_jsonl(path, images_dir)
    raise DataFormatError(f"{path}: unknown data format; use .json (merged-COCO) or .jsonl")


def draw_ocr_box(image: Image.Image, bbox, *, color=(0, 0, 255), width: int | None = None) -> Image.Image:
    """An RGB copy of `image` with a blue outline around the COCO bbox [x, y, w, h]."""
    x, y, w, h = _bbox(list(bbox), "ocr box")
    if w <= 0 or h <= 0:
        raise DataFormatError(f"ocr box: width and height must be positive, got {w} x {h}")
    out = image.convert("RGB")
    width = width or max(2, round(min(out.size) / 40))
    # a COCO box [x, y, w, h] covers pixels x .. x+w-1; PIL's rectangle includes both corners
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(out.width - 1.0, x + w - 1), min(out.height - 1.0, y + h - 1)
    ImageDraw.Draw(out).rectangle([x0, y0, x1, y1], outline=color, width=width)
    return out


@dataclass(frozen=True)
class RetrievalItem:
    record_index: int
    image_path: Path
    candidates: tuple[str, ...]
    positive: int


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def build_retrieval_items(records: list[Record], *, n_negatives: int, seed: int = 0) -> list[RetrievalItem]:
    """One item per captioned record: a caption of its own and `n_negatives` hard negatives.

    Negatives come from the other records' captions: a seeded sample of `50 * n_negatives`
    of them (all, for small splits) ranked by word overlap with the positive, ties broken by the
    RNG; captions equal to one of the record's own are excluded.
    """
    rng = random.Random(seed)
    captioned = [r for r in records if r.captions]
    pool = [(r.index, c, _words(c)) for r in captioned for c in dict.fromkeys(r.captions)]
    items = []
    for record in captioned:
        positive = rng.choice(record.captions)
        own = {_key(c) for c in record.captions}
        words = _words(positive)
        seen: set[str] = set()
        ranked = []
        sample = pool if len(pool) <= 50 * n_negatives else rng.sample(pool, 50 * n_negatives)
        for index, caption, caption_words in sample:
            key = _key(caption)
            if index != record.index and key not in own and key not in seen:
                seen.add(key)
                ranked.append((-len(words & caption_words), rng.random(), caption))
        if len(ranked) < n_negatives:
            raise ValueError(f"retrieval needs {n_negatives} distinct negative captions per image but only "
                             f"{len(ranked)} are available: use more captioned records or fewer negatives")
        negatives = [c for _, _, c in sorted(ranked)[:n_negatives]]
        candidates = [positive, *negatives]
        rng.shuffle(candidates)
        items.append(RetrievalItem(record.index, record.image_path, tuple(candidates), candidates.index(positive)))
    return items
