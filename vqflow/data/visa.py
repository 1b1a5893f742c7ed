"""VisA layout, read through its split CSV (columns ``object,split,label,image,mask``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Iterator

from .sample import GOOD, Sample

REQUIRED_COLUMNS = {"object", "split", "label", "image", "mask"}


def read_visa(root: str | Path, split_csv: str | Path, categories: Iterable[str] | None = None) -> Iterator[Sample]:
    """Yield samples of the VisA split CSV (e.g. ``split_csv/1cls.csv``); paths in it are relative to ``root``."""
    root = Path(root)
    split_csv = Path(split_csv) if Path(split_csv).is_absolute() else root / split_csv
    wanted = set(categories or [])
    with open(split_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = REQUIRED_COLUMNS - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{split_csv}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            category = row["object"].strip()
            if wanted and category not in wanted:
                continue
            split = row["split"].strip().lower()
            if split not in ("train", "test"):
                raise ValueError(f"{split_csv}:{line}: split must be train or test, got {row['split']!r}")
            anomalous = row["label"].strip().lower() in ("anomaly", "1", "bad")
            if split == "train" and anomalous:
                raise ValueError(f"{split_csv}:{line}: an anomalous image is listed in train")
            mask = row["mask"].strip()
            yield Sample(
                str(root / row["image"].strip()),
                category,
                split,
                int(anomalous),
                "anomaly" if anomalous else GOOD,
                str(root / mask) if anomalous and mask else "",
            )
