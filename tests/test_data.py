import json

import pytest
from PIL import Image

from hones_core.data import (DataFormatError, build_retrieval_items, draw_ocr_box, read_jsonl, read_merged_coco,
                             read_records)


def _coco(tmp_path, data):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (50, 40), (10, 10, 10)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"data": data}))
    return path


def test_merged_coco_records(tmp_path):
    path = _coco(tmp_path, [
        {"image_id": 7, "image_info": {"file_name": "a.png"}, "image_path": "/home/authors/a.png",
         "vqa": {"question": "What?", "answer": "red", "all_answers": ["red", "Red", "blue"]},
         "ocr": {"text": "STOP", "bbox": [1, 2, 30, 10]}, "captions": [{"caption": "one"}, {"caption": "two"}]},
        {"image_info": {"file_name": "a.png"}, "vqa": {"question": "How many?", "answer": "2"}},
    ])
    first, second = read_records(path)
    assert first.image_id == "7" and first.image_path == tmp_path / "images" / "a.png"   # authors' path ignored
    assert first.all_answers == ("red", "Red", "blue") and first.ocr_bbox == (1.0, 2.0, 30.0, 10.0)
    assert first.captions == ("one", "two")
    assert second.all_answers == ("2",) and second.ocr_text is None and second.captions == ()
    assert read_merged_coco(path, tmp_path / "elsewhere")[0].image_path == tmp_path / "elsewhere" / "a.png"


@pytest.mark.parametrize("record,message", [
    ({"vqa": {"answer": "x"}}, "record 0: 'vqa.question'"),
    ({"image_info": {"file_name": "a.png"}, "vqa": {"answer": "x"}}, "record 0: 'vqa.question'"),
    ({"image_info": {"file_name": "a.png"}, "ocr": {"text": "x", "bbox": [1, 2]}}, "record 0: 'bbox'"),
    ({"image_info": {"file_name": "a.png"}, "captions": [{"text": "x"}]}, "record 0: 'captions\\[\\].caption'"),
])
def test_malformed_records_are_reported_not_skipped(tmp_path, record, message):
    if "image_info" not in record:
        message = "record 0: missing 'image_info'"
    with pytest.raises(DataFormatError, match=message):
        read_records(_coco(tmp_path, [record]))


def test_jsonl_records_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"image": "a.png", "question": "q?", "answers": ["yes", "no"], "captions": ["c"]}\n\n'
                    '{"image": "b.png", "ocr_text": "hi", "ocr_bbox": [0, 0, 5, 5]}\n')
    a, b = read_jsonl(path)
    assert a.answer == "yes" and a.all_answers == ("yes", "no") and a.captions == ("c",)
    assert b.index == 1 and b.ocr_text == "hi" and b.image_path == tmp_path / "b.png"
    path.write_text('{"image": "a.png"}\n{oops\n')
    with pytest.raises(DataFormatError, match="line 2"):
        read_jsonl(path)
    with pytest.raises(DataFormatError, match=r"\.json \(merged-COCO\) or \.jsonl"):
        (tmp_path / "d.csv").write_text("x")
        read_records(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json")


def test_draw_ocr_box_outlines_in_blue():
    image = Image.new("RGB", (80, 60), (50, 50, 50))
    boxed = draw_ocr_box(image, [10, 20, 30, 15], width=2)
    assert boxed.getpixel((10, 20)) == (0, 0, 255) and boxed.getpixel((39, 34)) == (0, 0, 255)
    assert boxed.getpixel((40, 35)) == (50, 50, 50)          # x + w is outside the box
    assert boxed.getpixel((25, 27)) == (50, 50, 50)        # inside untouched
    assert image.getpixel((10, 20)) == (50, 50, 50)        # the original is not modified
    with pytest.raises(DataFormatError, match="positive"):
        draw_ocr_box(image, [1, 1, 0, 5])


def _captioned(n):
    from pathlib import Path

    from hones_core.data import Record
    colours = ["red", "green", "blue", "pink", "cyan", "gold"]
    return [Record(i, str(i), Path(f"{i}.png"), captions=(f"a {colours[i]} circle", f"one {colours[i]} thing"))
            for i in range(n)]


def test_retrieval_items_are_seeded_and_mine_hard_negatives():
    records = _captioned(6)
    items = build_retrieval_items(records, n_negatives=3, seed=4)
    assert items == build_retrieval_items(records, n_negatives=3, seed=4)
    assert items != build_retrieval_items(records, n_negatives=3, seed=5)
    for item in items:
        own = records[item.record_index].captions
        assert item.candidates[item.positive] in own
        negatives = [c for i, c in enumerate(item.candidates) if i != item.positive]
        assert not set(negatives) & set(own)
        # the hardest negatives share the template with the positive ("a X circle" vs "one X thing")
        template = item.candidates[item.positive].split()[0]
        assert all(n.split()[0] == template for n in negatives)
    with pytest.raises(ValueError, match="only 10 are available"):
        build_retrieval_items(records, n_negatives=11)
