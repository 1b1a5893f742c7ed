"""Validate a batch of new normal images (``<inbox>/<category>/*``) with the same suite, against the dataset.

The inbox rows are checked together with the current manifest, so an inbox image that duplicates a test
image (leakage) or a training image is caught; each rejected file is returned with its reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..data.manifest import build_manifest
from ..data.sample import Sample, is_image
from .suite import validate_manifest


@dataclass
class InboxVerdict:
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)


def inbox_samples(inbox: str | Path) -> list[Sample]:
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    return [
        Sample(str(p), folder.name, "train", 0)
        for folder in sorted(d for d in inbox.iterdir() if d.is_dir())
        for p in sorted(folder.iterdir())
        if p.is_file() and is_image(p.name)
    ]


def validate_inbox(inbox: str | Path, manifest: pd.DataFrame, limits: dict) -> InboxVerdict:
    """Accept or reject every inbox image; the existing dataset is context, never rejected here."""
    samples = inbox_samples(inbox)
    if not samples:
        return InboxVerdict()
    new = build_manifest(samples, 0.0, 0, progress=False)
    combined = pd.concat([manifest.assign(_inbox=False), new.assign(_inbox=True)], ignore_index=True)
    report = validate_manifest(combined.drop(columns="_inbox"), {**limits, "warn_only": []}, name="inbox")
    inbox_paths = set(new.path)
    rejected: dict[str, list[str]] = {}
    for failure in report.errors:  # a warning (a near-copy of another training image) does not reject
        for path, detail in zip(failure.files, failure.details or [""] * len(failure.files)):
            if path in inbox_paths:
                rejected.setdefault(path, []).append(
                    f"{failure.check}: {failure.reason}" + (f" ({detail})" if detail else "")
                )
    return InboxVerdict(sorted(inbox_paths - set(rejected)), rejected)
