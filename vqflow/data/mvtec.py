"""MVTec AD layout: ``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/*_mask.png``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

from .sample import GOOD, DatasetLayoutError, Sample, is_image


def mvtec_categories(root: str | Path) -> list[str]:
    """Every folder of ``root`` that has a ``train/good`` subfolder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root does not exist")
    return sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))


MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


@lru_cache(maxsize=64)
def _files_by_lower_name(folder: Path) -> dict[str, Path]:
    """A folder's files keyed by lower-case name: cameras and Windows tools write ``000.PNG`` / ``000_MASK.PNG``."""
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def _mask_for(root: Path, category: str, defect: str, image: Path) -> str:
    folder = root / category / "ground_truth" / defect
    files = _files_by_lower_name(folder)
    for suffix in MASK_SUFFIXES:
        for stem in (f"{image.stem}_mask", image.stem):
            candidate = files.get(f"{stem}{suffix}".lower())
            if candidate is not None:
                return str(candidate)
    raise FileNotFoundError(
        f"{image}: no ground-truth mask found in {folder} (expected {image.stem}_mask.png; "
        "any case of the name and of .png / .bmp / .tif)"
    )


def _optional_mask(root: Path, category: str, image: Path) -> str:
    try:
        return _mask_for(root, category, GOOD, image)
    except FileNotFoundError:
        return ""


def read_mvtec(root: str | Path, categories: Iterable[str] | None = None) -> Iterator[Sample]:
    """Yield the train and test samples of the selected categories (all when ``categories`` is empty)."""
    root = Path(root)
    available = mvtec_categories(root)
    selected = list(categories or available)
    missing = sorted(set(selected) - set(available))
    if missing:
        raise FileNotFoundError(f"{root}: categories {missing} not found (available: {available})")
    _files_by_lower_name.cache_clear()  # a folder read before may have changed
    for category in selected:
        claimed: set[str] = set()
        for image in _images(root / category / "train" / GOOD):
            yield Sample(str(image), category, "train", 0)
        test_root = root / category / "test"
        if not test_root.is_dir():
            raise FileNotFoundError(f"{test_root}: missing test folder")
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image in _images(defect_dir):
                if defect == GOOD:  # a mask file for a normal image is reported (the gate fails it), not ignored
                    sample = Sample(str(image), category, "test", 0, mask_path=_optional_mask(root, category, image))
                else:
                    sample = Sample(str(image), category, "test", 1, defect, _mask_for(root, category, defect, image))
                claimed.add(sample.mask_path)
                yield sample
        _no_orphan_masks(root / category / "ground_truth", claimed)


def _no_orphan_masks(ground_truth: Path, claimed: set[str]) -> None:
    """A mask no test image claims means a renamed or deleted image, or a mask in the wrong defect folder."""
    masks = (
        sorted(p for p in ground_truth.rglob("*") if p.is_file() and is_image(p.name)) if ground_truth.is_dir() else []
    )
    orphans = [str(p) for p in masks if str(p) not in claimed]
    if orphans:
        raise DatasetLayoutError(
            f"{len(orphans)} ground-truth masks belong to no test image (expected test/<defect>/<name>.png beside"
            f" ground_truth/<defect>/<name>_mask.png): {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}"
        )
