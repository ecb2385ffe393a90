import os
import sys

import numpy as np
import pytest
from PIL import Image

from yolc_kd.data.images import load_image_rgb, read_image_size
from yolc_kd.errors import UserError


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode,ext,expected", [
    ("RGB", "png", (10, 20, 30)),
    ("L", "png", (100, 100, 100)),
    ("1", "png", (255, 255, 255)),
    ("RGBA", "png", (10, 20, 30)),
    ("LA", "png", (100, 100, 100)),
    ("CMYK", "jpg", None),
    ("RGB", "jpg", None),
    ("RGB", "bmp", (10, 20, 30)),
])
def test_modes_load_as_rgb_uint8(tmp_path, mode, ext, expected):
    colour = {"RGB": (10, 20, 30), "L": 100, "1": 1, "RGBA": (10, 20, 30, 0), "LA": (100, 0),
              "CMYK": (0, 255, 255, 0)}[mode]
    path = _save(Image.new(mode, (7, 5), colour), tmp_path / f"x.{ext}")
    arr = load_image_rgb(path)
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8
    if expected is not None:
        assert tuple(arr[2, 3]) == expected
    if mode == "CMYK":  # C=0, M=255, Y=255, K=0 is red
        assert arr[2, 3, 0] > 200 and arr[2, 3, 1] < 60 and arr[2, 3, 2] < 60


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (6, 4), 1)
    img.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    img.info["transparency"] = 0
    arr = load_image_rgb(_save(img, tmp_path / "p.png", transparency=0))
    assert arr.shape == (4, 6, 3) and tuple(arr[0, 0]) == (200, 50, 25)


def test_16bit_png_is_shifted_to_8bit(tmp_path):
    data = np.full((4, 6), 0x1234, dtype=np.uint16)
    data[0, 0] = 65535
    path = tmp_path / "g16.png"
    Image.fromarray(data).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = load_image_rgb(path)
    assert arr.dtype == np.uint8 and arr.shape == (4, 6, 3)
    assert tuple(arr[1, 1]) == (0x12, 0x12, 0x12) and tuple(arr[0, 0]) == (255, 255, 255)
    assert read_image_size(path) == (6, 4)


def test_int32_and_float_tiff(tmp_path):
    Image.fromarray(np.full((3, 5), 70000, dtype=np.int32)).save(tmp_path / "i.tif")
    assert tuple(load_image_rgb(tmp_path / "i.tif")[0, 0]) == (255, 255, 255)
    Image.fromarray(np.full((3, 5), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    assert tuple(load_image_rgb(tmp_path / "f.tif")[0, 0]) == (128, 128, 128)


def test_exif_orientation_is_ignored(tmp_path):
    img = Image.new("RGB", (40, 20), (1, 2, 3))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    path = _save(img, tmp_path / "e.jpg", exif=exif.tobytes())
    assert load_image_rgb(path).shape == (20, 40, 3)
    assert read_image_size(path) == (40, 20)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.png"):
        load_image_rgb(tmp_path / "nope.png")
    with pytest.raises(UserError, match="nope.png"):
        read_image_size(tmp_path / "nope.png")


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path, ext):
    rng = np.random.default_rng(0)
    path = tmp_path / f"broken.{ext}"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=f"broken.{ext}"):
        load_image_rgb(path)


def test_non_image_and_directory(tmp_path):
    (tmp_path / "notes.png").write_text("hello, not an image")
    with pytest.raises(UserError, match="notes.png"):
        load_image_rgb(tmp_path / "notes.png")
    with pytest.raises(UserError, match="notes.png"):
        read_image_size(tmp_path / "notes.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserError, match="dir.png"):
        load_image_rgb(tmp_path / "dir.png")


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs a byte-oriented file system")
def test_non_utf8_file_name(tmp_path):
    name = os.fsdecode(b"caf\xe9 \xff#1.png")
    path = os.path.join(str(tmp_path), name)
    Image.new("RGB", (3, 2), (9, 8, 7)).save(path, format="PNG")
    assert tuple(load_image_rgb(path)[1, 2]) == (9, 8, 7)
    assert read_image_size(path) == (3, 2)
    os.remove(path)
    with pytest.raises(UserError, match=r"caf\\xe9|caf\\udce9"):
        load_image_rgb(path)
