"""The manifest: one row per image with its split, label, mask and the statistics validation checks.

It is the single description of a dataset that every later stage (and DVC) reads. Rows are sorted and
the validation split is carved out of train/good per category with a seeded shuffle, so the same inputs
give a byte-identical CSV.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ..io import atomic_path
from .images import ImageLoadError, decode_image, load_mask, read_bytes, to_rgb
from .sample import Sample

COLUMNS = [
    "image_id",
    "path",
    "category",
    "split",
    "label",
    "defect_type",
    "mask_path",
    "width",
    "height",
    "mode",
    "sha256",
    "phash",
    "decode_error",
    "mean",
    "std",
    "sharpness",
    "mask_width",
    "mask_height",
    "mask_fraction",
    "mask_nonbinary",
    "mask_error",
]
SPLITS = ("train", "val", "test")
STATS_SIZE = 256
# prepare measures what it can decode and leaves the verdict to the gate (validate.max_size): an image of 9000 x
# 9000 is measured and refused for its size there, not called undecodable; beyond this it is not decoded at all
STATS_MAX_PIXELS = 400_000_000
# the dihedral group: a near-copy may be flipped or turned by 90 degrees (the first, the image as it is)
DIHEDRAL = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def assign_validation(samples: Iterable[Sample], val_fraction: float, seed: int) -> list[tuple[Sample, str]]:
    """Move a seeded ``val_fraction`` of each category's train images into the "val" split.

    Validation images are normal images never trained on; thresholds are calibrated on them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"prepare.val_fraction must be in [0, 1), got {val_fraction}")
    samples = list(samples)
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        if sample.split == "train":
            by_category[sample.category].append(i)
    val: set[int] = set()
    for category, indices in sorted(by_category.items()):
        rng = np.random.default_rng([seed, int(hashlib.sha256(category.encode()).hexdigest()[:8], 16)])
        count = int(round(val_fraction * len(indices)))
        if val_fraction > 0 and len(indices) >= 2:
            count = max(count, 1)
        val.update(np.asarray(indices)[rng.permutation(len(indices))[:count]].tolist())
    return [(s, "val" if i in val else s.split) for i, s in enumerate(samples)]


def _sharpness(small: Image.Image) -> float:
    """Variance of the Laplacian of the grey image at 256 px: low for blurred or flat images."""
    return float(ndimage.laplace(np.asarray(small, dtype=np.float64) / 255.0).var())


HASH_SIZE = 16  # a 256-bit hash: 64 bits cannot tell two bottles of one line apart (bench/results/near_copies.md)


def perceptual_hashes(small: Image.Image) -> str:
    """The 256-bit DCT perceptual hash (imagehash.phash) of the grey image and of its 7 flips and quarter turns,
    as 8 hex words: a re-encoded, resized or brightened copy hashes within a few bits of the image, a flipped
    or rotated one within a few bits of one of the variants (vqflow/validation/checks.py compares them)."""
    import imagehash

    return " ".join(str(imagehash.phash(small if t is None else small.transpose(t), HASH_SIZE)) for t in DIHEDRAL)


def image_stats(path: str) -> dict:
    """Decode a file and measure what validation checks; decoding failures are recorded, not raised."""
    row: dict = {
        "sha256": "",
        "phash": "",
        "width": 0,
        "height": 0,
        "mode": "",
        "decode_error": "",
        "mean": np.nan,
        "std": np.nan,
        "sharpness": np.nan,
    }
    try:
        data = read_bytes(path)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        img = decode_image(data, path, STATS_MAX_PIXELS)
    except ImageLoadError as exc:
        row["decode_error"] = str(exc)
        return row
    row.update(width=img.width, height=img.height, mode=img.mode)
    grey = to_rgb(img).convert("L")
    gray = np.asarray(grey)
    small = grey.resize((STATS_SIZE, STATS_SIZE), Image.BILINEAR)
    row.update(
        mean=float(gray.mean() / 255.0),
        std=float(gray.std() / 255.0),
        sharpness=_sharpness(small),
        phash=perceptual_hashes(small),
    )
    return row


def mask_stats(path: str) -> dict:
    row = {"mask_width": 0, "mask_height": 0, "mask_fraction": np.nan, "mask_nonbinary": np.nan, "mask_error": ""}
    if not path:
        return row
    try:
        img = decode_image(read_bytes(path), path)
    except ImageLoadError as exc:  # a 0-byte, truncated or foreign file: the gate names it (check mask_readable)
        row["mask_error"] = str(exc)
        return row
    gray = np.asarray(img.convert("L")) if img.mode not in ("I;16", "I") else np.asarray(img) / 257.0
    row.update(
        mask_width=img.width,
        mask_height=img.height,
        mask_fraction=float(load_mask(path).mean()),
        # among the mask's non-zero pixels: a small defect drawn with 77 instead of 255 is then 100 % non-binary
        mask_nonbinary=float(((gray > 0) & (gray < 255)).sum() / max(1, int((gray > 0).sum()))),
    )
    return row


def build_manifest(
    samples: Iterable[Sample], val_fraction: float = 0.1, seed: int = 0, progress: bool = True
) -> pd.DataFrame:
    """Turn reader samples into the manifest table (one row per image, statistics included)."""
    rows = []
    assigned = assign_validation(samples, val_fraction, seed)
    for sample, split in tqdm(assigned, desc="prepare", unit="img", disable=not progress):
        row = {
            "path": sample.path,
            "category": sample.category,
            "split": split,
            "label": int(sample.label),
            "defect_type": sample.defect_type,
            "mask_path": sample.mask_path,
        }
        row.update(image_stats(sample.path))
        row.update(mask_stats(sample.mask_path))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ValueError("the dataset sources yielded no images")
    frame = frame.sort_values(["category", "split", "label", "defect_type", "path"], kind="stable")
    frame["image_id"] = [f"{i:06d}" for i in range(len(frame))]
    return frame[COLUMNS].reset_index(drop=True)


def write_manifest(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run `vqflow prepare` first)")
    frame = pd.read_csv(
        path,
        dtype={"image_id": str, "mask_path": str, "decode_error": str, "mode": str, "phash": str, "mask_error": str},
        keep_default_na=False,
        na_values={"mean": [""], "std": [""], "sharpness": [""], "mask_fraction": [""], "mask_nonbinary": [""]},
    )
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    return frame


def manifest_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
