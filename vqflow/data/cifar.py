"""CIFAR-10 semantic anomaly detection (VQ-Flow paper, Sec. 4): some classes normal, the rest anomalous."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from .images import ZIP_SEPARATOR
from .sample import GOOD, Sample

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CATEGORY = "cifar10"


def read_cifar_semantic(
    root: str | Path,
    normal_classes: Iterable[int],
    archive: str = "cifar10_jpeg.zip",
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Iterator[Sample]:
    """Train: train images of the normal classes. Test: test images of all classes, others anomalous.

    There are no masks. ``*_per_class`` keep the first N images of each class folder (for quick runs).
    """
    normal = sorted(set(int(c) for c in normal_classes))
    if not normal or any(c < 0 or c >= len(CLASSES) for c in normal):
        raise ValueError(f"normal_classes must be indices in 0..9, got {normal}")
    zpath = Path(root) / archive
    with zipfile.ZipFile(zpath) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
    by_folder: dict[tuple[str, str], list[str]] = {}
    for name in names:
        split, cls, _ = name.split("/", 2)
        by_folder.setdefault((split, cls), []).append(name)
    for split, limit in (("train", train_per_class), ("test", test_per_class)):
        for index, cls in enumerate(CLASSES):
            if split == "train" and index not in normal:
                continue
            members = by_folder.get((split, cls), [])
            if not members:
                raise FileNotFoundError(f"{zpath}: no images under {split}/{cls}/")
            anomalous = int(index not in normal)
            for member in members[:limit]:
                yield Sample(f"{zpath}{ZIP_SEPARATOR}{member}", CATEGORY, split, anomalous, cls if anomalous else GOOD)
