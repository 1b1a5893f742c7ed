"""Extra normal training images in ``<root>/<category>/*.png`` (where the retraining flow adds inbox images)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .sample import Sample, is_image


def read_normal_folder(root: str | Path) -> Iterator[Sample]:
    """Every image of every category folder, as a normal training image; a missing root yields nothing."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        for path in sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name)):
            yield Sample(str(path), folder.name, "train", 0)
