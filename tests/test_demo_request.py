"""Input checks (`hones_core.demo.request`): every bad input gets a message in our words."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from hones_core import rankings
from hones_core.demo import DemoInputError, DemoService, open_image

from conftest import demo_request as _request

@pytest.mark.parametrize("change, message", [
    (dict(task="nope"), "Unknown task"),
    (dict(question=""), "question is empty"),
    (dict(question="x" * 10_000), "10,000 characters"),
    (dict(factor=float("nan")), "finite number"),
    (dict(factor=3.5), "between 0 and 3"),
    (dict(factor=-0.1), "between 0 and 3"),
    (dict(factor="abc"), "must be a number"),
    (dict(budget_pct=0), "above 0"),
    (dict(budget_pct=100.5), "at most 100"),
    (dict(budget_pct=float("inf")), "finite"),
    (dict(method="magic"), "not available"),
    (dict(image=None), "No image"),
])
def test_bad_inputs_raise_clear_errors(demo_service, examples, change, message):
    with pytest.raises(DemoInputError, match=message):
        _request(demo_service, examples["vqa"][0], **change)



def test_retrieval_and_ocr_input_errors(demo_service, examples):
    retrieval, ocr = examples["retrieval"][0], examples["ocr"][0]
    with pytest.raises(DemoInputError, match="at least 2"):
        _request(demo_service, retrieval, candidates="only one caption", gold=None)
    with pytest.raises(DemoInputError, match="at least 2"):
        _request(demo_service, retrieval, candidates="same\nsame\n  \n", gold=None)
    with pytest.raises(DemoInputError, match="gold answer must be one of the candidates"):
        _request(demo_service, retrieval, gold="not a candidate")
    with pytest.raises(DemoInputError, match="four numbers"):
        _request(demo_service, ocr, bbox="1, 2, three, 4")
    with pytest.raises(DemoInputError, match="outside"):
        _request(demo_service, ocr, bbox="500, 500, 10, 10")
    drawn = _request(demo_service, ocr, bbox="10, 10, 30, 20").image
    assert drawn.getpixel((10, 15)) == (0, 0, 255)          # the app draws the blue box


def test_missing_task_is_refused_with_the_reason(toy_vlm, app_rankings, examples):
    artifact = rankings.load(app_rankings)
    del artifact.tasks["caption"]
    service = DemoService(toy_vlm, artifact)
    assert service.tasks == ["vqa", "ocr", "retrieval"] and "caption" in service.unavailable()
    with pytest.raises(DemoInputError, match="not available: the rankings .* have no caption task"):
        _request(service, examples["caption"][0])


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height, with a tiny (invalid) body: a decompression bomb's signature."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_image_checks(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGBA", (64, 48), (10, 20, 30, 0)).save(good)
    image, notes = open_image(str(good))
    assert image.mode == "RGB" and image.size == (64, 48) and notes == []
    assert image.getpixel((0, 0)) == (255, 255, 255)      # transparent -> white, not black
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DemoInputError, match="not an image"):
        open_image(str(text))
    truncated = tmp_path / "truncated.png"
    Image.effect_noise((200, 200), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(DemoInputError, match="damaged or truncated"):
        open_image(str(truncated))
    with pytest.raises(DemoInputError, match=r"more pixels than the app decodes safely \(at most 50 megapixels\)") \
            as bomb:
        open_image(str(_png_header_only(tmp_path / "bomb.png", 20000, 20000)))
    assert "DOS" not in str(bomb.value) and "decompression" not in str(bomb.value)   # our words, not PIL's
    with pytest.raises(DemoInputError, match="megapixels"):
        open_image(str(_png_header_only(tmp_path / "big.png", 9000, 9000)))
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(DemoInputError, match="only 1×1 px") as small:
        open_image(str(tiny))
    assert "damaged" not in str(small.value)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (2000, 20)).save(thin)
    with pytest.raises(DemoInputError, match="elongated"):
        open_image(str(thin))
    large = tmp_path / "large.png"
    Image.new("RGB", (3000, 1500), (1, 2, 3)).save(large)
    image, notes = open_image(str(large))
    assert image.size == (2048, 1024) and "downscaled" in notes[0]
    with pytest.raises(DemoInputError, match="No image"):
        open_image(None)
