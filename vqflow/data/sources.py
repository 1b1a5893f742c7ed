"""The dataset readers by ``prepare.sources`` kind: each layout's reader, imported only by the prepare stage."""

from __future__ import annotations

from typing import Any, Iterator

from .cifar import read_cifar_semantic
from .folder import read_normal_folder
from .magnetic_tile import read_magnetic_tile
from .mvtec import read_mvtec
from .sample import Sample
from .visa import read_visa

READERS = {
    "mvtec": lambda s: read_mvtec(s["root"], s.get("categories") or None),
    "visa": lambda s: read_visa(s["root"], s.get("split_csv", "split_csv/1cls.csv"), s.get("categories") or None),
    "magnetic_tile": lambda s: read_magnetic_tile(s["root"], s.get("split_csv", "split_80_20_seed0.csv")),
    "normal_folder": lambda s: read_normal_folder(s["root"]),
    "cifar10": lambda s: read_cifar_semantic(
        s["root"],
        s["normal_classes"],
        s.get("archive", "cifar10_jpeg.zip"),
        s.get("train_per_class"),
        s.get("test_per_class"),
    ),
}


def read_sources(sources: list[dict[str, Any]]) -> Iterator[Sample]:
    """Yield the samples of every configured source (``prepare.sources`` in params.yaml)."""
    if not sources:
        raise ValueError("prepare.sources is empty: name at least one dataset")
    for i, source in enumerate(sources):
        kind = source.get("kind")
        if kind not in READERS:
            raise ValueError(
                f"prepare.sources[{i}].kind: unknown dataset kind {kind!r}; choose one of {sorted(READERS)}"
            )
        if "root" not in source:
            raise ValueError(f"prepare.sources[{i}]: missing 'root'")
        yield from READERS[kind](source)
