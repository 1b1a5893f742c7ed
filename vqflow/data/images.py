"""Image and mask loading that copes with what factories actually produce.

Handles RGB, grayscale, palette, RGBA, 16-bit PNG and EXIF orientation; any file that cannot be
decoded raises :class:`ImageLoadError` naming the file. Paths of the form ``archive.zip::member``
read a member of an uncompressed or compressed zip without extracting it.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ZIP_SEPARATOR = "::"
DEFAULT_MAX_PIXELS = 64_000_000


class ImageLoadError(ValueError):
    """An image or mask file could not be read; the message names the file and the reason."""


@lru_cache(maxsize=8)
def _open_zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def read_bytes(path: str | Path) -> bytes:
    """Read a file, or a member of a zip archive given as ``archive.zip::member``."""
    path = str(path)
    try:
        if ZIP_SEPARATOR in path:
            archive, member = path.split(ZIP_SEPARATOR, 1)
            return _open_zip(archive).read(member)
        return Path(path).read_bytes()
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc})") from exc


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an upright PIL image in its own mode, fully loaded."""
    if not data:
        raise ImageLoadError(f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > max_pixels:
                    raise ImageLoadError(
                        f"{name}: image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels} pixels"
                    )
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(f"{name}: image exceeds the limit of {max_pixels} pixels ({exc})") from exc
        except Image.UnidentifiedImageError as exc:  # its message is the repr of our in-memory buffer
            raise ImageLoadError(f"{name}: cannot decode image (not a recognised image format)") from exc
        except Exception as exc:  # PIL raises many types for corrupt data
            raise ImageLoadError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float images are rescaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0)
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file as upright 8-bit RGB."""
    return to_rgb(decode_image(read_bytes(path), str(path), max_pixels))


def load_mask(path: str | Path | None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Load a ground-truth mask as a boolean array (foreground = value above half the range).

    ``size`` is the (width, height) of the image; an absent mask (``None`` or empty path) is all false.
    """
    if not path:
        if size is None:
            raise ValueError("load_mask needs a size when there is no mask file")
        return np.zeros((size[1], size[0]), dtype=bool)
    img = decode_image(read_bytes(path), str(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        return arr > (32767.5 if arr.max() > 255 else 127.5)
    return np.asarray(img.convert("L")) > 127


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean mask to ``size`` x ``size`` with nearest-neighbour sampling."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 127


def image_to_array(img: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to ``size`` x ``size`` (bicubic, antialiased) and return float32 CHW in [0, 1]."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
