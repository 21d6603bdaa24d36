from pathlib import Path

import pytest
from PIL import Image

from hones_core.data import Record
from hones_core.tasks import (TASKS, caption_prompt, check_task, clean_answer, items_for_task, ocr_prompt,
                              retrieval_prompt, vqa_prompt)


def test_prompts_are_the_official_ones():
    assert vqa_prompt("What color?") == "Question: What color?\nAnswer the question with a short phrase."
    assert ocr_prompt() == "Transcribe the text inside the blue box.\nOutput text only."
    assert caption_prompt() == "Describe the image in one sentence."
    assert retrieval_prompt("a cat") == ("Candidate: a cat\nDoes the candidate correctly describe the image?\n"
                                         "Answer exactly Yes or No.")
    assert tuple(TASKS) == ("vqa", "ocr", "caption", "retrieval")
    with pytest.raises(ValueError, match="tasks are vqa, ocr, caption, retrieval"):
        check_task("count")
    # the user's text is filled in as is, braces included (only the template is formatted)
    assert vqa_prompt("What is {x}?").startswith("Question: What is {x}?\n")
    with pytest.raises(ValueError, match="the ocr prompt takes no text"):
        TASKS["ocr"].prompt("extra")
    with pytest.raises(ValueError, match="the vqa prompt takes a text"):
        TASKS["vqa"].prompt()


def _records(tmp_path: Path) -> list[Record]:
    out = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), (60, 60, 60)).save(path)
        out.append(Record(i, str(i), path, question=f"q{i}?", answer="red", all_answers=("red", "Red", "blue"),
                          ocr_text="word" if i % 2 else None, ocr_bbox=(5, 5, 20, 10) if i % 2 else None,
                          captions=(f"a red circle number {i}", f"red circle {i}", "x y z")))
    return out


def test_items_for_each_task(tmp_path):
    records = _records(tmp_path)
    vqa = items_for_task("vqa", records)
    assert len(vqa) == 6 and vqa[0].targets == ("red", "Red", "blue") and vqa[0].answer == "red"
    assert vqa[0].prompt == vqa_prompt("q0?")
    ocr = items_for_task("ocr", records)
    assert [i.record_index for i in ocr] == [1, 3, 5] and ocr[0].targets == ("word",)
    image = ocr[0].load_image()
    assert image.getpixel((5, 5)) == (0, 0, 255) and image.getpixel((15, 10)) == (60, 60, 60)   # blue box drawn
    assert items_for_task("vqa", records)[1].load_image().getpixel((5, 5)) == (60, 60, 60)      # not for VQA
    caption = items_for_task("caption", records, limit=2)
    assert len(caption) == 2 and caption[1].targets == records[1].captions and caption[1].answer == records[1].captions[0]
    retrieval = items_for_task("retrieval", records, n_negatives=3, seed=1)
    for item in retrieval:
        assert len(item.candidates) == 4 and item.candidates[item.positive] in records[item.record_index].captions
        assert item.prompt == item.candidate_prompts[item.positive] and item.targets == ("Yes",)
    with pytest.raises(ValueError, match="no record has 'ocr_text'"):
        items_for_task("ocr", [records[0]])


def test_unreadable_image_names_the_path(tmp_path):
    records = _records(tmp_path)
    records[0].image_path.write_bytes(b"not a png")
    with pytest.raises(OSError, match="0.png"):
        items_for_task("vqa", records)[0].load_image()


@pytest.mark.parametrize("raw,task,expected", [
    ("  red.\n", "vqa", "red"), ("Answer: two", "vqa", "two"), ('"apple"', "ocr", "apple"),
    ("\n\na red circle.\nmore", "caption", "a red circle."), ("Assistant: Yes", "retrieval", "Yes"), ("", "vqa", ""),
])
def test_clean_answer(raw, task, expected):
    assert clean_answer(raw, task) == expected
