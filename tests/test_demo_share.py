"""Share links: inputs -> query string -> the same inputs, and clear refusals of damaged links."""

import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from hones_core.assets import DEFAULT_EXAMPLES
from hones_core.demo import read_examples
from hones_core.demo.share import ShareIndex, make_link, parse_link
from hones_core.errors import DemoInputError

TASKS = ["vqa", "ocr", "caption", "retrieval"]


@pytest.fixture(scope="module")
def gallery():
    return ShareIndex(read_examples(DEFAULT_EXAMPLES))


def _query(link):
    return {k: v[0] for k, v in parse_qs(urlsplit(link.query).query, keep_blank_values=True).items()}


def test_a_gallery_example_travels_by_id_with_the_typed_inputs(gallery):
    entry = read_examples(DEFAULT_EXAMPLES)["vqa"][0]
    link = make_link(gallery, task="vqa", image=entry["image"],
                     texts={"question": "What color is the star?", "bbox": "1, 2, 3, 4", "gold": "red"},
                     method="random", budget=2.0, factor=0.5)
    query = _query(link)
    first = Path(entry["image"]).name.removesuffix(".png")        # an example's id: its image file's name
    # the bbox box belongs to OCR, not VQA: it is left out
    assert query == {"task": "vqa", "example": first, "question": "What color is the star?", "gold": "red",
                     "method": "random", "budget": "2", "factor": "0.5"}
    assert "opens the same example" in link.note
    shared = parse_link(query, gallery, TASKS)
    assert (shared.task, shared.example, dict(shared.texts)) == (
        "vqa", first, {"question": "What color is the star?", "gold": "red"})
    assert (shared.method, shared.budget, shared.factor) == ("random", "2", "0.5")


def test_a_copy_of_an_example_image_is_recognised_by_content_and_an_upload_is_not(gallery, tmp_path):
    entry = read_examples(DEFAULT_EXAMPLES)["ocr"][0]
    copy = tmp_path / "gradio-cache-copy.png"                 # gradio serves examples from its own cache
    shutil.copy(entry["image"], copy)
    assert gallery.identify(str(copy), "ocr") == Path(entry["image"]).name.removesuffix(".png")
    upload = tmp_path / "mine.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(upload)
    link = make_link(gallery, task="ocr", image=str(upload), texts={"bbox": "4, 4, 20, 10"}, method="hones",
                     budget=1, factor=0)
    assert "example" not in _query(link) and _query(link)["bbox"] == "4, 4, 20, 10"
    assert "not in the link" in link.note


def test_unknown_or_damaged_links_are_refused_with_the_parameter_named(gallery):
    assert parse_link({"utm_source": "x"}, gallery, TASKS) is None      # not one of ours: the page opens as usual
    with pytest.raises(DemoInputError, match="example 'example-999'"):
        parse_link({"example": "example-999"}, gallery, TASKS)
    with pytest.raises(DemoInputError, match="task is 'segmentation'"):
        parse_link({"task": "segmentation"}, gallery, TASKS)
    with pytest.raises(DemoInputError, match="question parameter has 5000"):
        parse_link({"task": "vqa", "question": "x" * 5000}, gallery, TASKS)
    # an example alone implies its task
    retrieval = Path(read_examples(DEFAULT_EXAMPLES)["retrieval"][0]["image"]).name.removesuffix(".png")
    assert parse_link({"example": retrieval}, gallery, TASKS).task == "retrieval"
