"""Image loading: every source form, mode conversion, size extremes and bad files."""

import io

import pytest
from PIL import Image

from data_fixtures import make_image
from sparsezip_pl.data.images import ImageLoadError, load_image, to_rgb


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    make_image(path, mode=mode)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (8, 8)


def test_transparent_pixels_composite_on_white(tmp_path):
    path = tmp_path / "a.png"
    make_image(path, mode="RGBA", color=(0, 0, 255, 0))  # fully transparent blue
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)
    make_image(path, mode="RGBA", color=(0, 0, 255, 255))  # opaque blue stays blue
    assert load_image(path).getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 1
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled(tmp_path):
    path = tmp_path / "g.png"
    make_image(path, mode="I;16", color=40000)
    assert load_image(path).getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8


def test_tiny_and_large(tmp_path):
    make_image(tmp_path / "tiny.png", size=(1, 1))
    assert load_image(tmp_path / "tiny.png").size == (1, 1)
    make_image(tmp_path / "big.png", size=(6000, 4000))
    assert load_image(tmp_path / "big.png").size == (6000, 4000)  # no resizing here


def test_sources(tmp_path):
    data = make_image(tmp_path / "a.png")
    for source in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "a.png")},
                   Image.open(io.BytesIO(data)), tmp_path / "a.png"):
        assert load_image(source).mode == "RGB"


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found.*nope.jpg") as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.reason == "missing_image"


@pytest.mark.parametrize("data", [b"this is not an image", b""])
def test_corrupt_bytes(tmp_path, data):
    (tmp_path / "bad.jpg").write_bytes(data)
    with pytest.raises(ImageLoadError, match="bad.jpg: cannot decode") as info:
        load_image(tmp_path / "bad.jpg")
    assert info.value.reason == "corrupt_image"


def test_truncated_jpeg(tmp_path):
    data = make_image(tmp_path / "full.jpg", size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "cut.jpg")
    assert info.value.reason == "corrupt_image"
