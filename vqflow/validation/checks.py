"""Row-level facts about a manifest that the expectation suite checks (one boolean column per relation).

Per-image statistics (decodability, size, mode, brightness, contrast, sharpness, sha256) are computed by the
prepare stage; relations between rows (duplicates, leakage, category counts, masks vs images) are derived
here, so every failed expectation can name the offending files.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.manifest import DIHEDRAL, HASH_SIZE

TRANSFORMS = (
    "as it is",
    "flipped left-right",
    "flipped top-bottom",
    "turned 90",
    "turned 180",
    "turned 270",
    "transposed",
    "transversed",
)
assert len(TRANSFORMS) == len(DIHEDRAL)
CHUNK = 256  # rows compared at once (memory: CHUNK x rows x 8 variants x 4 words)


HASH_BITS = HASH_SIZE * HASH_SIZE


def _hash_words(phash: pd.Series) -> np.ndarray:
    """The manifest's ``phash`` strings as an (n, 8, words) uint64 array (rows without a hash: all ones)."""
    width = HASH_BITS // 64
    words = np.full((len(phash), len(DIHEDRAL), width), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, text in enumerate(phash.astype(str)):
        parts = text.split()
        if len(parts) == len(DIHEDRAL):
            words[i] = [[int(p[16 * w : 16 * (w + 1)], 16) for w in range(width)] for p in parts]
    return words


def _nearest(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash (n, words) the Hamming distance to every reference (m, 8, words) under its best variant:
    (n, m) distances and (n, m) variant indices."""
    distances = np.bitwise_count(queries[:, None, None, :] ^ references[None, :, :, :]).sum(axis=3, dtype=np.int16)
    return distances.min(axis=2), distances.argmin(axis=2)


def near_copies(frame: pd.DataFrame, max_distance: int) -> tuple[dict[int, str], dict[int, str]]:
    """Pairs of images of one category whose perceptual hashes differ by at most ``max_distance`` bits (of 256)
    under some flip or quarter turn, byte-identical pairs left to the sha256 checks. Returns per row index what it
    is a near-copy of: (across train/val vs test, within one of them)."""
    across: dict[int, str] = {}
    within: dict[int, str] = {}
    if max_distance < 0:
        return across, within
    usable = frame[frame.phash.astype(str).str.len() > 0]
    for _, rows in usable.groupby("category", sort=False):
        words, paths, shas = _hash_words(rows.phash), rows.path.to_numpy(), rows.sha256.to_numpy()
        group = np.where(rows.split.to_numpy() == "test", 1, 0)
        index = rows.index.to_numpy()
        for start in range(0, len(rows), CHUNK):
            block = slice(start, start + CHUNK)
            distance, variant = _nearest(words[block, 0], words)
            close = (distance <= max_distance) & (shas[block, None] != shas[None, :])
            for i, j in zip(*np.nonzero(close)):
                a, b = start + i, j
                if a == b:
                    continue
                note = f"near-copy of {paths[b]} ({TRANSFORMS[variant[i, j]]}, {distance[i, j]} of {HASH_BITS} bits differ)"
                target = across if group[a] != group[b] else within
                target.setdefault(int(index[a]), note)
                target.setdefault(
                    int(index[b]),
                    f"near-copy of {paths[a]} ({TRANSFORMS[variant[i, j]]}, {distance[i, j]} of {HASH_BITS} bits differ)",
                )
    return across, within


def derive(manifest: pd.DataFrame, limits: dict) -> pd.DataFrame:
    """The manifest plus boolean check columns (True = fine); ``limits`` is the ``validate`` params section."""
    frame = manifest.copy()
    defective = frame.label == 1
    has_mask = frame.mask_path.astype(str) != ""
    training = frame.split.isin(["train", "val"])
    frame["decodes"] = frame.decode_error.astype(str) == ""
    mask_readable = frame.mask_error.astype(str) == ""
    frame["mask_readable"] = ~has_mask | mask_readable
    frame["mask_matches_image"] = ~defective | (
        has_mask & (~mask_readable | ((frame.mask_width == frame.width) & (frame.mask_height == frame.height)))
    )
    frame["mask_not_empty"] = ~defective | (frame.mask_fraction.fillna(0) > 0) | ~has_mask
    frame["mask_binary"] = ~has_mask | (
        frame.mask_nonbinary.fillna(1.0) <= float(limits.get("max_mask_nonbinary", 0.5))
    )
    frame["normal_has_no_mask"] = defective | ~has_mask
    frame["train_is_normal"] = ~training | (frame.label == 0)
    test_hashes = set(frame.loc[frame.split == "test", "sha256"]) - {""}
    train_hashes = set(frame.loc[training, "sha256"]) - {""}
    frame["not_leaked"] = ~(
        (training & frame.sha256.isin(test_hashes)) | ((frame.split == "test") & frame.sha256.isin(train_hashes))
    )
    split_group = frame.split.where(frame.split == "test", "train")
    duplicated = frame[frame.sha256 != ""].assign(group=split_group).duplicated(["group", "sha256"], keep=False)
    frame["unique_in_split"] = ~duplicated.reindex(frame.index, fill_value=False)
    across, within = near_copies(frame, int(limits.get("near_copy_distance", 10)))
    frame["near_copy_of"] = pd.Series({**within, **across}, dtype=object).reindex(frame.index).fillna("")
    frame["not_near_copy_across_splits"] = ~frame.index.isin(list(across))
    frame["not_near_copy_in_split"] = ~frame.index.isin(list(within))
    counts = frame.assign(group=split_group).groupby(["category", "group"]).size().unstack(fill_value=0)
    min_train, min_test = int(limits.get("min_train_per_category", 10)), int(limits.get("min_test_per_category", 2))
    train_counts = frame.category.map(counts.get("train", pd.Series(dtype=int))).fillna(0)
    test_counts = frame.category.map(counts.get("test", pd.Series(dtype=int))).fillna(0)
    frame["category_has_enough_images"] = (train_counts >= min_train) & (test_counts >= min_test)
    # one size per category (its most common one) unless the category is allowed to vary
    decodes = frame.decodes & (frame.width > 0)
    sizes = frame.width.astype(str) + "x" + frame.height.astype(str)
    usual = sizes[decodes].groupby(frame.category[decodes]).agg(lambda s: s.value_counts().index[0])
    variable = set(limits.get("variable_size_categories") or [])
    frame["size_consistent"] = ~decodes | frame.category.isin(variable) | (sizes == frame.category.map(usual))
    frame["train_images_in_category"] = train_counts.astype(int)
    frame["test_images_in_category"] = test_counts.astype(int)
    return frame


def details(row: pd.Series, check: str, limits: dict) -> str:
    """What exactly is wrong with one row that failed ``check`` ("": the check's reason says it all)."""
    if check == "decodable":
        return str(row.decode_error)
    if check == "size_allowed":
        low, high = int(limits.get("min_size", 32)), int(limits.get("max_size", 8192))
        return f"{row.width}x{row.height} px, allowed {low} to {high} per side (validate.min_size / max_size)"
    if check == "mask_readable":
        return f"mask {row.mask_path}: {row.mask_error}"
    if check == "mask_matches_image":
        if not str(row.mask_path):
            return "no mask file"
        return f"mask {row.mask_path} is {row.mask_width}x{row.mask_height}, the image {row.width}x{row.height}"
    if check in ("no_near_copies_across_splits", "no_near_copies_in_split"):
        return str(row.near_copy_of)
    return ""
