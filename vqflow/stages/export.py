"""export: the packaged model into the BentoML store under its content tag, promoted to champion only from a
committed run on the promotion branch and only if not worse than the champion (vqflow/model_store.py)."""

from __future__ import annotations

from pathlib import Path

from ..config import section


def run(params: dict) -> dict:
    """Store the trained model (content tag) in the BentoML store; promote it to champion only from a committed
    run on the promotion branch, and only if not worse than the champion."""
    from ..io import read_json, write_json
    from ..model_store import export as export_model

    out = section(params, "outputs", ("model", "metrics", "export"))
    section(params, "export", ("tolerance_mean", "tolerance_category"))
    record = export_model(out["model"], read_json(Path(out["metrics"])), params)
    write_json(out["export"], record)
    return record


def promote(params: dict, tag: str, new_line: bool = False) -> dict:
    """Make a stored model the champion on purpose (the same not-worse rule as the export stage); ``new_line``:
    start a champion line with it."""
    from ..model_store import promote_explicitly

    section(params, "export", ("tolerance_mean", "tolerance_category"))
    return promote_explicitly(tag, params, new_line)
