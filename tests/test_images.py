import io

import numpy as np
import pytest
from PIL import Image

from vqflow.data.images import ImageLoadError, decode_image, load_image, load_mask


def _save(tmp_path, name, img, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def test_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cases = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "gray.jpg": Image.fromarray(rgb[..., 0]),
    }
    for name, img in cases.items():
        out = load_image(_save(tmp_path, name, img))
        assert out.mode == "RGB" and out.size == (30, 20), name
    gray = np.asarray(load_image(tmp_path / "gray.png"))
    assert (gray[..., 0] == rgb[..., 0]).all() and (gray[..., 1] == gray[..., 2]).all()
    opaque = np.asarray(load_image(tmp_path / "rgba.png"))
    assert (opaque == rgb).all()


def test_16_bit_png_is_rescaled(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "deep.png", Image.fromarray(values))
    out = np.asarray(load_image(path))[..., 0]
    assert out.tolist() == [[0, 128, 255]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, "rotated.jpg", img, exif=exif)
    assert Image.open(path).size == (40, 10)
    assert load_image(path).size == (10, 40)


def test_corrupt_png_error_names_the_file(tmp_path):
    good = _save(tmp_path, "good.png", Image.new("RGB", (64, 64), (10, 20, 30)))
    broken = tmp_path / "broken_part.png"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="broken_part.png"):
        load_image(broken)
    garbage = tmp_path / "notes.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="notes.png.*cannot decode"):
        load_image(garbage)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png: empty file"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_pixel_limit():
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        decode_image(buf.getvalue(), "big.png", max_pixels=10_000)


def test_mask_binarised_at_half_range(tmp_path):
    mask = np.array([[0, 100, 128, 255]], dtype=np.uint8)
    path = _save(tmp_path, "m.png", Image.fromarray(mask))
    assert load_mask(path).tolist() == [[False, False, True, True]]
    assert load_mask("", size=(4, 2)).shape == (2, 4)
