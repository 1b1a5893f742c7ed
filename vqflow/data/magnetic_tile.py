"""Magnetic Tile Defects (Huang et al. 2020) through a split CSV ``image,mask,label,defect_type,split``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from .sample import GOOD, Sample

CATEGORY = "magnetic_tile"


def read_magnetic_tile(root: str | Path, split_csv: str = "split_80_20_seed0.csv") -> Iterator[Sample]:
    root = Path(root)
    path = root / split_csv
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Magnetic Tile split CSV not found")
    with open(path, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            label = int(row["label"])
            split = row["split"].strip()
            if split not in ("train", "test"):
                raise ValueError(f"{path}:{line}: split must be train or test, got {split!r}")
            defect = row["defect_type"].strip() or GOOD
            yield Sample(
                str(root / row["image"]),
                CATEGORY,
                split,
                label,
                defect if label else GOOD,
                str(root / row["mask"]) if label else "",
            )
