"""Champions: the BentoML model store holds every exported model; a git-tracked record says which one serves.

- **Export** imports a model bundle into the store under a content tag ``vqflow-anomaly:<sha256 of the bundle>``,
  so the same model has the same tag on every machine and exporting it again changes nothing (a fresh clone with
  an empty store re-exports, and gets the tag its champion record names).
- **Promotion** appends the model to the champion record (``outputs.champions``, committed with the pipeline
  run) when it is not worse than the champion of its data set: no mean metric drops more than
  ``tolerance_mean`` and no category's mAD more than ``tolerance_category``. A champion is measured on one
  evaluation split (``metrics.dataset``: its categories and a fingerprint of its images): a model of another data
  set is never compared with it, and the first model of a new data set starts that data set's champion line
  (``vqflow promote TAG --new-line`` starts one on purpose). The service serves the record's latest entry. The export stage promotes only from a committed run on
  ``export.promote_branch`` outside a DVC experiment; anything else stays a challenger until ``vqflow promote
  TAG`` is asked for explicitly (same rule). The retrain flow can hold a promotion for a person's decision
  (``retrain.approval: required``, ``HOLD_VARIABLE``). ``git log -p registry/champions.json`` is the history.
- **Publishing** copies a promoted model to ``export.publish`` (e.g. ``s3://bucket/models/``), from where a
  serving machine imports it (``bentoml models import``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bundle import ModelBundle
from .io import read_json, write_json

MODEL_NAME = "vqflow-anomaly"
DEFAULT_RECORD = "registry/champions.json"
# The retrain flow works on ``<prefix><branch>`` and fast-forwards ``<branch>`` to it only when the whole run
# succeeded: a run there promotes as if on ``<branch>`` (a failed run's promotion is reset with its branch).
TRANSACTION_PREFIX = "vqflow-retrain/"
# Set by the retrain flow for the export stage when a person decides (retrain.approval: required): HOLD's text is why
# the model must not be promoted now; NOTE is prefixed to a promotion's reason (who approved it).
HOLD_VARIABLE = "VQFLOW_PROMOTION_HOLD"
NOTE_VARIABLE = "VQFLOW_PROMOTION_NOTE"
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
            reasons.append(
                f"{category} mAD {100 * value:.2f} < champion {100 * old['mad']:.2f} - {100 * tolerance_category:.2f}"
            )
    return Decision(not reasons, reasons or ["not worse than the champion on every mean metric and category"])


def same_dataset(entry: dict, metrics: dict) -> bool:
    """Was the champion ``entry`` measured on the data set of ``metrics``? Entries of before the record kept the
    data set are matched by their categories."""
    theirs, ours = entry.get("metrics", {}).get("dataset"), metrics.get("dataset")
    if theirs and ours:
        return theirs.get("fingerprint") == ours.get("fingerprint")
    return set(entry.get("metrics", {}).get("per_category", {})) == set(metrics.get("per_category", {}))


def line_champion(record: list[dict], metrics: dict) -> dict | None:
    """The latest champion measured on the data set of ``metrics`` (None: that data set has none yet)."""
    return next((entry for entry in reversed(record) if same_dataset(entry, metrics)), None)


def _describe(metrics: dict) -> str:
    dataset = metrics.get("dataset") or {}
    categories = dataset.get("categories") or sorted(metrics.get("per_category", {}))
    fingerprint = dataset.get("fingerprint", "")
    return f"categories {', '.join(categories)}" + (f", evaluation split {fingerprint[:12]}" if fingerprint else "")


def read_record(path: str | Path = DEFAULT_RECORD) -> list[dict]:
    """The champion history (oldest first); empty when there was never a champion."""
    path = Path(path)
    if not path.is_file():
        return []
    record = read_json(path)
    if not isinstance(record, list) or not all(isinstance(e, dict) and "tag" in e for e in record):
        raise ValueError(f"{path}: not a champion record (a JSON list of entries with a 'tag')")
    return record


def champion(path: str | Path = DEFAULT_RECORD) -> dict | None:
    """The current champion's record entry ({tag, metrics, git_commit, promoted_at, reason}), or None."""
    record = read_record(path)
    return record[-1] if record else None


def model_tag(bundle: ModelBundle) -> str:
    """The content tag of a bundle: same files, same tag, on every machine."""
    return f"{MODEL_NAME}:{bundle.digest()[:32]}"


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def promotion_blocker(branch: str, watched: tuple[str, ...] = ("params.yaml", "dvc.yaml", "vqflow")) -> str | None:
    """Why the export stage must not promote now (None: it may): an experiment, another branch, uncommitted
    code or params, or the retrain flow holding it for a person's decision."""
    if os.environ.get(HOLD_VARIABLE):
        return os.environ[HOLD_VARIABLE]
    if os.environ.get("DVC_EXP_NAME"):
        return f"this is DVC experiment {os.environ['DVC_EXP_NAME']!r}: experiments never promote"
    current = _git("rev-parse", "--abbrev-ref", "HEAD")
    if current is None:
        return "not a git repository: only a committed run promotes (or `vqflow promote TAG`)"
    if current not in (branch, TRANSACTION_PREFIX + branch):
        return f"on branch {current!r}: the export stage promotes only on {branch!r} (or `vqflow promote TAG`)"
    changed = _git("status", "--porcelain", "--", *[w for w in watched if Path(w).exists()])
    if changed:
        return f"uncommitted changes ({changed.splitlines()[0].strip()} ...): only a committed run promotes"
    return None


def _store_model(tag: str):
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        return None


def import_bundle(bundle: ModelBundle, metrics: dict, dvc_lock: str | Path = "dvc.lock") -> str:
    """Put the bundle into the local model store under its content tag (no-op when it is there). Returns the tag."""
    import hashlib
    import shutil

    import bentoml

    tag = model_tag(bundle)
    if _store_model(tag) is not None:
        return tag
    lock = Path(dvc_lock)
    metadata = {
        "model": bundle.meta["model"],
        "backbone": bundle.spec.name,
        "image_size": bundle.spec.image_size,
        "metrics": _recorded(metrics),
        "thresholds": bundle.thresholds,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none",
    }
    with bentoml.models.create(
        tag, labels={"model": bundle.meta["model"]}, metadata=json.loads(json.dumps(metadata, default=str))
    ) as ref:
        for item in bundle.path.iterdir():
            shutil.copy2(item, Path(ref.path) / item.name)
    return tag


def _recorded(metrics: dict) -> dict:
    """What the store and the champion record keep of a metrics JSON: the figures and the data set measured on."""
    kept = {"mean": metrics["mean"], "per_category": metrics["per_category"]}
    if metrics.get("dataset"):
        kept["dataset"] = metrics["dataset"]
    return kept


def promote(tag: str, metrics: dict, record_path: str | Path, reason: str, publish: str = "") -> None:
    """Append ``tag`` to the champion record (atomically) and publish it when a destination is configured."""
    if publish:  # first: a failed upload leaves no champion entry behind, so a retry publishes again
        publish_model(tag, publish)
    entry = {
        "tag": tag,
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "reason": reason,
        "metrics": _recorded(metrics),
    }
    write_json(record_path, [*read_record(record_path), entry])


def publish_model(tag: str, destination: str) -> str:
    """Export a stored model to ``destination`` (a folder or ``s3://bucket/prefix/``). Returns the file URL."""
    import bentoml

    return bentoml.models.export_model(tag, destination if destination.endswith("/") else destination + "/")


@dataclass(frozen=True)
class PromotionRule:
    """The ``export`` params and the champion record's path, read once."""

    tolerance_mean: float = 0.005
    tolerance_category: float = 0.01
    promote_branch: str = "main"
    publish: str = ""
    record: str = DEFAULT_RECORD

    @classmethod
    def from_params(cls, params: dict) -> "PromotionRule":
        p = params.get("export") or {}
        return cls(
            float(p.get("tolerance_mean", cls.tolerance_mean)),
            float(p.get("tolerance_category", cls.tolerance_category)),
            str(p.get("promote_branch", cls.promote_branch)),
            str(p.get("publish", "") or ""),
            str((params.get("outputs") or {}).get("champions", DEFAULT_RECORD)),
        )


def _decide(
    tag: str, metrics: dict, rule: PromotionRule, blocker: str | None, note: str = "", new_line: bool = False
) -> dict:
    """The one promotion rule: ``tag`` becomes the champion unless it already is, it is worse than the champion of
    its data set, or ``blocker`` says why not now; ``new_line``: a champion line starts with it, uncompared.
    Returns the decision record (promoting when decided); its ``eligible`` is the rule's verdict before any blocker."""
    record = read_record(rule.record)
    current = record[-1] if record else None
    if current and current["tag"] == tag and not new_line:
        return {
            "tag": tag,
            "role": "champion",
            "promote": False,
            "eligible": False,
            "champion_tag": tag,
            "reasons": ["already the champion (same content tag)"],
        }
    rival = None if new_line else line_champion(record, metrics)
    decision = compare(metrics, rival["metrics"] if rival else None, rule.tolerance_mean, rule.tolerance_category)
    if new_line:
        decision.reasons = [f"a new champion line started on purpose ({_describe(metrics)})"]
    elif rival is None and current is not None:
        decision.reasons = [
            f"the first model of its data set ({_describe(metrics)}): it starts that data set's champion line; "
            f"the champion before, {current['tag']}, was measured on other data ({_describe(current['metrics'])}) "
            "and is not compared with it"
        ]
    decision.champion_tag = (rival or current or {}).get("tag")
    eligible = decision.promote
    if blocker:
        decision = Decision(False, [*decision.reasons, f"not promoted: {blocker}"], decision.champion_tag)
    if decision.promote:
        promote(tag, metrics, rule.record, note + "; ".join(decision.reasons), rule.publish)
    return {
        "tag": tag,
        "role": "champion" if decision.promote else "challenger",
        "eligible": eligible,
        **asdict(decision),
    }


def export(model_dir: str | Path, metrics: dict, params: dict) -> dict:
    """The export stage: store the model, promote it if allowed and not worse. Returns the decision record."""
    rule = PromotionRule.from_params(params)
    tag = import_bundle(ModelBundle(model_dir), metrics)
    return _decide(tag, metrics, rule, promotion_blocker(rule.promote_branch), os.environ.get(NOTE_VARIABLE, ""))


def promote_explicitly(tag: str, params: dict, new_line: bool = False) -> dict:
    """`vqflow promote TAG`: make a stored model the champion on purpose, if it is not worse than the champion of
    its data set (same rule); ``new_line``: start a champion line with it, compared with none."""
    stored = _store_model(tag)
    if stored is None or not tag.startswith(MODEL_NAME + ":"):
        raise ValueError(
            f"promote: {tag!r} is not a {MODEL_NAME} model in the BentoML store "
            f"(`bentoml models list {MODEL_NAME}` shows them)"
        )
    record = _decide(
        str(stored.tag),
        stored.info.metadata["metrics"],
        PromotionRule.from_params(params),
        None,
        "explicit `vqflow promote`; ",
        new_line,
    )
    if record["role"] != "champion":
        raise ValueError(
            f"promote: {record['tag']} is worse than the champion {record['champion_tag']}: "
            + "; ".join(record["reasons"])
        )
    return record
