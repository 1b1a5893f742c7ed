"""generate: the embedded synthetic dataset (MVTec AD layout)."""

from __future__ import annotations

from pathlib import Path

from ..config import section


def run(params: dict) -> Path:
    """Write the embedded synthetic dataset."""
    from ..data.synthetic import generate as write_dataset

    p = section(params, "generate", ("root",))
    return write_dataset(
        p["root"],
        p.get("categories"),
        int(p.get("train_per_category", 60)),
        int(p.get("test_good_per_category", 12)),
        int(p.get("test_per_defect", 5)),
        int(p.get("size", 256)),
        int(p.get("seed", 0)),
    )
