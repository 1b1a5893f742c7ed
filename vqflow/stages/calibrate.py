"""calibrate: per-category thresholds from the validation split (normal images never trained on)."""

from __future__ import annotations

import pandas as pd

from ..config import section
from .common import manifest_and_cache


def thresholds_of(params: dict, model, manifest: pd.DataFrame, cache, device) -> dict:
    """Score the validation images with ``model`` and fit the thresholds (``thresholds`` params)."""
    from ..scoring import score_batches
    from ..thresholds import Calibration

    p = section(params, "thresholds", ("target_frr", "pixel_fpr"))
    val = manifest[manifest.split == "val"].reset_index(drop=True)
    calibration = Calibration(val, float(p["target_frr"]), float(p["pixel_fpr"]))
    for _, scored in score_batches(model, cache, val.image_id.tolist(), device, progress=False):
        calibration.add(scored.scores, scored.maps)
    return calibration.result()


def run(params: dict) -> dict:
    """Calibrate the trained weights (``outputs.weights``) and write ``outputs.thresholds``."""
    from ..backbones import resolve_device
    from ..io import write_json
    from ..weights import load_model

    out = section(params, "outputs", ("weights", "thresholds"))
    device = resolve_device(str(section(params, "train").get("device", "auto")))  # where the model was trained
    model, _ = load_model(out["weights"], device)
    manifest, cache = manifest_and_cache(params)
    thresholds = thresholds_of(params, model, manifest, cache, device)
    write_json(out["thresholds"], thresholds)
    return thresholds
