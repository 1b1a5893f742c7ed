"""Row-level facts about a manifest that the expectation suite checks (one boolean column per relation).

Per-image statistics (decodability, size, mode, brightness, contrast, sharpness, sha256) are computed by the
prepare stage; relations between rows (duplicates, leakage, category counts, masks vs images) are derived
here, so every failed expectation can name the offending files.
"""

from __future__ import annotations

import pandas as pd


def derive(manifest: pd.DataFrame, limits: dict) -> pd.DataFrame:
    """The manifest plus boolean check columns (True = fine); ``limits`` is the ``validate`` params section."""
    frame = manifest.copy()
    defective = frame.label == 1
    has_mask = frame.mask_path.astype(str) != ""
    training = frame.split.isin(["train", "val"])
    frame["decodes"] = frame.decode_error.astype(str) == ""
    frame["mask_matches_image"] = ~defective | (
        has_mask & (frame.mask_width == frame.width) & (frame.mask_height == frame.height)
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
