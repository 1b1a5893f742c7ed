"""The record every dataset reader yields."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``split`` is "train" or "test" here; prepare carves "val" out of train.

    ``category`` is recorded for reporting and per-category thresholds only; models never see it.
    """

    path: str
    category: str
    split: str
    label: int
    defect_type: str = GOOD
    mask_path: str = ""


class DatasetLayoutError(ValueError):
    """A dataset folder holds files its layout cannot account for (e.g. a mask that belongs to no image)."""


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
