"""The BentoML model store: export a trained model, and the champion/challenger promotion rule.

The champion is the most recent model of ``MODEL_NAME`` labelled ``role: champion``. A new model becomes the
champion only when none of its mean metrics is worse than the champion's by more than ``tolerance_mean``
and no category's mAD drops by more than ``tolerance_category``; otherwise it is stored as a challenger.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_NAME = "vqflow-anomaly"
COMPARED = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "mad")


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    champion_tag: str | None = None


def compare(new: dict, champion: dict | None, tolerance_mean: float, tolerance_category: float) -> Decision:
    """Is ``new`` (metrics JSON) not worse than ``champion`` (metrics JSON or None) within the tolerances?"""
    if champion is None:
        return Decision(True, ["there is no champion yet"])
    reasons = []
    for name in COMPARED:
        old, value = champion["mean"].get(name), new["mean"].get(name)
        if old is not None and value is not None and value == value and old == old and value < old - tolerance_mean:
            reasons.append(f"mean {name} {100 * value:.2f} < champion {100 * old:.2f} - {100 * tolerance_mean:.2f}")
    for category, old in champion["per_category"].items():
        if category not in new["per_category"]:
            reasons.append(f"category {category} is missing from the new evaluation")
            continue
        value = new["per_category"][category]["mad"]
        if value < old["mad"] - tolerance_category:
            reasons.append(f"{category} mAD {100 * value:.2f} < champion {100 * old['mad']:.2f} - {100 * tolerance_category:.2f}")
    return Decision(not reasons, reasons or ["not worse than the champion on every mean metric and category"])


def champion():
    """The current champion model in the BentoML store, or None."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.list(MODEL_NAME)
    except NotFound:
        return None
    candidates = [m for m in stored if m.info.labels.get("role") == "champion"]
    return max(candidates, key=lambda m: m.info.creation_time) if candidates else None


def _git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def export(model_dir: str | Path, metrics: dict, params: dict, tolerance_mean: float, tolerance_category: float,
           dvc_lock: str | Path = "dvc.lock") -> dict:
    """Import the trained model into the store, labelled champion or challenger. Returns the decision record."""
    import hashlib

    import bentoml

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    current = champion()
    decision = compare(metrics, current.info.metadata.get("metrics") if current else None, tolerance_mean,
                       tolerance_category)
    decision.champion_tag = str(current.tag) if current else None
    lock = Path(dvc_lock)
    metadata = {
        "model": config["model"], "backbone": config["backbone"]["name"], "image_size": config["backbone"]["image_size"],
        "metrics": {"mean": metrics["mean"], "per_category": metrics["per_category"]},
        "thresholds": thresholds, "params": {k: params.get(k) for k in ("model", "train", "features", "thresholds")},
        "git_commit": _git_commit(),
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none",
    }
    labels = {"role": "champion" if decision.promote else "challenger", "model": config["model"]}
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=json.loads(json.dumps(metadata, default=str))) as ref:
        for item in model_dir.iterdir():
            shutil.copy2(item, Path(ref.path) / item.name)
    return {"tag": str(ref.tag), "role": labels["role"], **asdict(decision)}
