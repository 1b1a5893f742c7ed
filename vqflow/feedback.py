"""Operators' feedback: an image confirmed normal becomes training data for the next retrain.

A confirmed normal goes into the retrain inbox, ``<inbox>/<category>/<sha256><suffix>``, the folder (or S3
prefix) the retrain flow reads; an image labelled defective goes to ``<review>/<category>/`` for people to
look at, never into training data. Each image is stored under the sha256 of its bytes (the same image twice is
one file) with a JSON sidecar ``<name>.json``: category, label, the score and decision the model gave, the
model's tag and when it arrived. The sidecar is written first and the image last, each in one piece (a local
temporary file renamed into place, or one S3 PUT): a visible image always has its sidecar.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from .io import atomic_path

LABELS = ("normal", "defective")
SIDECAR = ".json"
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}
CATEGORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class FeedbackError(ValueError):
    """A feedback request that cannot be stored; the message names the field."""


@dataclass
class Stored:
    label: str
    category: str
    location: str  # where the image is (path or URL)
    sha256: str
    duplicate: bool  # the same bytes were stored before: nothing was written
    sidecar: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def review_beside(inbox: str) -> str:
    """The default review folder: ``review`` beside the inbox (as the quarantine is)."""
    return (
        str(PurePosixPath(inbox.rstrip("/")).parent / "review")
        if "://" not in inbox
        else (inbox.rstrip("/").rsplit("/", 1)[0] + "/review")
    )


def filesystem(url: str):
    """``(fs, path)`` for a folder or an fsspec URL. Never a cached instance: fsspec would otherwise hand back a
    filesystem built for an earlier endpoint or credentials (the environment is read when the instance is made)."""
    from fsspec.core import url_to_fs

    return url_to_fs(url, skip_instance_cache=True)


class FeedbackStore:
    """The inbox (confirmed normals) and the review folder (defectives): local folders or ``s3://`` prefixes."""

    def __init__(self, inbox: str, review: str = ""):
        if not inbox:
            raise FeedbackError(
                "feedback is not configured: set the inbox (VQFLOW_INBOX, a folder or s3://bucket/prefix)"
            )
        self.inbox, self.review = inbox.rstrip("/"), (review or review_beside(inbox)).rstrip("/")

    def put(self, data: bytes, image_format: str | None, category: str, label: str, **record: Any) -> Stored:
        """Store ``data`` (an image already decoded and checked by the caller) under its content's name."""
        if label not in LABELS:
            raise FeedbackError(f"label: {label!r} is not one of {list(LABELS)}")
        if not category or not CATEGORY.match(category):
            raise FeedbackError(f"category: {category!r} is not a category name (letters, digits, '_', '.', '-')")
        suffix = SUFFIXES.get((image_format or "").upper())
        if suffix is None:
            raise FeedbackError(f"image: format {image_format!r} cannot be stored (one of {sorted(SUFFIXES)})")
        digest = hashlib.sha256(data).hexdigest()
        root = self.inbox if label == "normal" else self.review
        location = f"{root}/{category}/{digest[:32]}{suffix}"
        sidecar = {
            "category": category,
            "label": label,
            "sha256": digest,
            "bytes": len(data),
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": "feedback",
            **record,
        }
        fs, path = filesystem(location)
        if fs.exists(path):
            previous = filesystem(location + SIDECAR)
            known = json.loads(previous[0].cat_file(previous[1])) if previous[0].exists(previous[1]) else sidecar
            return Stored(label, category, location, digest, True, known)
        self._write(location + SIDECAR, (json.dumps(sidecar, indent=2) + "\n").encode())
        self._write(location, data)
        return Stored(label, category, location, digest, False, sidecar)

    def _write(self, location: str, data: bytes) -> None:
        from fsspec.implementations.local import LocalFileSystem

        fs, path = filesystem(location)
        if isinstance(fs, LocalFileSystem):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        else:  # an object store: one PUT, the object appears whole
            fs.pipe_file(path, data)


def read_sidecar(image_path: str) -> dict[str, Any] | None:
    """The feedback record of an inbox image, or None (an image copied in by hand)."""
    fs, path = filesystem(image_path + SIDECAR)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None
