"""prepare: the configured sources read into the manifest, with the seeded validation split."""

from __future__ import annotations

import pandas as pd

from ..config import section
from . import DataValidationError


def run(params: dict) -> pd.DataFrame:
    """Read ``prepare.sources`` and write the manifest."""
    from ..data.manifest import build_manifest, write_manifest
    from ..data.sample import DatasetLayoutError
    from ..data.sources import read_sources

    p = section(params, "prepare", ("sources", "manifest"))
    try:
        frame = build_manifest(read_sources(p["sources"]), float(p.get("val_fraction", 0.1)), int(p.get("seed", 0)))
    except DatasetLayoutError as exc:  # bad data, not bad params: exit 1 like the gate
        raise DataValidationError(str(exc)) from exc
    write_manifest(frame, p["manifest"])
    return frame
