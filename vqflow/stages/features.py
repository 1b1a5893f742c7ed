"""features: the backbone pyramid of every manifest image, in the content-addressed cache."""

from __future__ import annotations

import time

from .. import timing
from ..config import section
from .common import backbone_spec


def run(params: dict) -> tuple[dict, int]:
    """Extract the images the cache lacks: (index, images extracted)."""
    from ..data.manifest import read_manifest
    from ..features import extract_features

    manifest_path = section(params, "prepare", ("manifest",))["manifest"]
    p = section(params, "features", ("cache",))
    started = time.perf_counter()
    index, extracted = extract_features(
        read_manifest(manifest_path),
        backbone_spec(params),
        p["cache"],
        int(p.get("batch_size", 16)),
        str(p.get("device", "auto")),
    )
    timing.record(params, "features", seconds=time.perf_counter() - started, images_extracted=extracted)
    return index, extracted
