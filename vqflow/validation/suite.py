"""The data-validation gate: a Great Expectations (GX Core 1.x) suite over the manifest, run as a Checkpoint.

Every expectation carries ``meta.check`` (its short name) and ``meta.reason`` (what is wrong when it fails);
``validate.warn_only`` in params downgrades named checks to warnings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .checks import derive, details

ID_COLUMN = "path"


def _expectations(limits: dict) -> list:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def flag(column: str, check: str, reason: str):
        return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], meta={"check": check, "reason": reason})

    image_rows = Column("decode_error") == ""  # statistics exist only for images that decode
    low, high = int(limits.get("min_size", 32)), int(limits.get("max_size", 8192))
    expectations = [
        flag("decodes", "decodable", "the file cannot be decoded as an image"),
        gxe.ExpectColumnValuesToBeBetween(
            column="width",
            min_value=low,
            max_value=high,
            row_condition=image_rows,
            meta={"check": "size_allowed", "reason": f"image width outside the allowed {low} to {high} px"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height",
            min_value=low,
            max_value=high,
            row_condition=image_rows,
            meta={"check": "size_allowed", "reason": f"image height outside the allowed {low} to {high} px"},
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mode",
            value_set=list(limits.get("modes", ["RGB", "L", "RGBA", "P", "I;16", "I", "LA"])),
            row_condition=image_rows,
            meta={"check": "mode_allowed", "reason": "image mode (channels) not in the allowed set"},
        ),
        flag("mask_readable", "mask_readable", "the mask file cannot be read (empty, truncated or not an image)"),
        flag("mask_matches_image", "mask_matches_image", "defective test image without a mask of the same size"),
        flag("mask_not_empty", "mask_not_empty", "the mask of a defective image is empty"),
        flag(
            "mask_binary",
            "mask_binary",
            "the mask is not binary (too many of its non-zero pixels are between 0 and 255)",
        ),
        flag("normal_has_no_mask", "normal_has_no_mask", "a normal image has a mask"),
        flag("train_is_normal", "train_is_normal", "a defective image is in the training data"),
        flag("not_leaked", "no_train_test_leakage", "the same image (sha256) is in train and in test"),
        flag("unique_in_split", "no_duplicates_in_split", "exact duplicate image inside one split"),
        flag(
            "not_near_copy_across_splits",
            "no_near_copies_across_splits",
            "a test image is a near-copy (flipped, turned, re-encoded, resized or brightened) of a training image:"
            " the test split would measure memory (validate.near_copy_distance)",
        ),
        flag(
            "not_near_copy_in_split",
            "no_near_copies_in_split",
            "two images of one split are near-copies (validate.near_copy_distance); a warning: the same part"
            " photographed twice is normal",
        ),
        flag("category_has_enough_images", "min_images_per_category", "the category has too few train or test images"),
        flag(
            "size_consistent",
            "size_consistent_in_category",
            "the image size differs from its category's usual size (allow with validate.variable_size_categories)",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="std",
            min_value=float(limits.get("min_contrast", 0.01)),
            row_condition=image_rows,
            meta={"check": "not_blank", "reason": "the image is blank (all black, all white or flat)"},
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="sharpness",
            min_value=float(limits.get("min_sharpness", 5e-5)),
            row_condition=image_rows,
            meta={"check": "not_blurred", "reason": "the image is extremely blurred (low Laplacian variance)"},
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split",
            value_set=["train", "val", "test"],
            meta={"check": "split_allowed", "reason": "unknown split"},
        ),
    ]
    allowed = limits.get("categories") or []
    if allowed:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="category",
                value_set=list(allowed),
                meta={"check": "category_allowed", "reason": "category not allowed"},
            )
        )
    else:
        expectations.append(
            gxe.ExpectColumnValuesToMatchRegex(
                column="category",
                regex=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
                meta={"check": "category_allowed", "reason": "category name is empty or has unexpected characters"},
            )
        )
    return expectations


WARNINGS = {"no_near_copies_in_split"}  # checks that never stop the gate (validate.warn_only adds more)


@dataclass
class Failure:
    check: str
    reason: str
    column: str
    count: int
    files: list[str]
    warning: bool
    details: list[str] = field(default_factory=list)  # per file (same order): what exactly is wrong, or ""

    def described(self, limit: int = 5) -> list[str]:
        """The first ``limit`` files, each with what is wrong with it."""
        return [f"{f}: {d}" if d else f for f, d in zip(self.files[:limit], self.details[:limit] or [""] * limit)]


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure] = field(default_factory=list)
    result: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Failure]:
        return [f for f in self.failures if not f.warning]


def _context(docs_dir: Path | None):
    import great_expectations as gx

    if docs_dir is None:
        return gx.get_context(mode="ephemeral"), None
    project = Path(tempfile.mkdtemp(prefix="vqflow-gx-"))
    return gx.get_context(mode="file", project_root_dir=str(project)), project


def validate_manifest(
    manifest: pd.DataFrame, limits: dict, docs_dir: str | Path | None = None, name: str = "manifest"
) -> ValidationReport:
    """Run the suite as a GX Checkpoint; optionally build the Data Docs HTML into ``docs_dir``."""
    import great_expectations as gx

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    frame = derive(manifest, limits).reset_index(drop=True)
    context, project = _context(Path(docs_dir) if docs_dir else None)
    try:
        asset = context.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(f"{name}_asset")
        batch_definition = asset.add_batch_definition_whole_dataframe(f"{name}_batch")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
        for expectation in _expectations(limits):
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(data=batch_definition, suite=suite, name=f"{name}_validation")
        )
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if project else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_checkpoint",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ID_COLUMN]},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        if project:
            built = project / "gx" / "uncommitted" / "data_docs" / "local_site"
            target = Path(docs_dir)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(built, target)
    finally:
        if project:
            shutil.rmtree(project, ignore_errors=True)
    warn_only = set(limits.get("warn_only", []) or []) | WARNINGS
    rows = frame.set_index(ID_COLUMN, drop=False)
    rows = rows[~rows.index.duplicated()]
    failures = []
    run_result = next(iter(outcome.run_results.values()))
    for item in run_result.results:
        if item.success:
            continue
        meta = item.expectation_config.meta or {}
        result = item.result or {}
        files = [row[ID_COLUMN] for row in result.get("unexpected_index_list", []) if isinstance(row, dict)]
        check = meta.get("check", item.expectation_config.type)
        failures.append(
            Failure(
                check,
                meta.get("reason", ""),
                item.expectation_config.kwargs.get("column", ""),
                int(result.get("unexpected_count", len(files))),
                files,
                check in warn_only,
                [details(rows.loc[f], check, limits) if f in rows.index else "" for f in files],
            )
        )
    success = not any(not f.warning for f in failures)
    return ValidationReport(success, failures, json.loads(json.dumps(outcome.describe_dict(), default=str)))
