"""package: the self-contained model bundle from the trained weights, the calibrated thresholds and the extractor
that made the cached features (folded, so serving needs no weights source), with model.onnx checked against
torch when ``package.onnx``."""

from __future__ import annotations

from pathlib import Path

from ..config import section


def run(params: dict) -> Path:
    """Write ``outputs.model`` (vqflow/bundle.py's layout)."""
    from ..bundle import ModelBundle
    from ..features import BackboneSpec
    from ..io import read_json
    from ..weights import load_model

    out = section(params, "outputs", ("weights", "thresholds", "model"))
    with_onnx = bool((params.get("package") or {}).get("onnx", False))
    model, meta = load_model(out["weights"])
    extra = {k: v for k, v in meta.items() if k not in ("model", "config")}
    ModelBundle.write(
        out["model"],
        model,
        meta["model"],
        model.config,
        read_json(out["thresholds"]),
        BackboneSpec(**meta["backbone"]).build(),  # the extractor of the features it was trained on
        extra=extra,
        onnx=with_onnx,
    )
    return Path(out["model"])
