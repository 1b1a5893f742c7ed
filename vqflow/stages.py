"""The pipeline stages as plain functions of params (the CLI, DVC and Prefect all call these)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import timing
from .config import section


def generate(params: dict) -> Path:
    """Write the embedded synthetic dataset (MVTec AD layout)."""
    from .data.synthetic import generate as write_dataset

    p = section(params, "generate", ("root",))
    return write_dataset(
        p["root"],
        p.get("categories"),
        int(p.get("train_per_category", 60)),
        int(p.get("test_good_per_category", 12)),
        int(p.get("test_per_defect", 5)),
        int(p.get("size", 256)),
        int(p.get("seed", 0)),
    )


def prepare(params: dict) -> pd.DataFrame:
    """Read the configured sources and write the manifest (with the seeded validation split)."""
    from .data import read_sources
    from .data.manifest import build_manifest, write_manifest
    from .data.sample import DatasetLayoutError

    p = section(params, "prepare", ("sources", "manifest"))
    try:
        frame = build_manifest(read_sources(p["sources"]), float(p.get("val_fraction", 0.1)), int(p.get("seed", 0)))
    except DatasetLayoutError as exc:  # bad data, not bad params: exit 1 like the gate
        raise DataValidationError(str(exc)) from exc
    write_manifest(frame, p["manifest"])
    return frame


def backbone_spec(params: dict):
    from .features import BackboneSpec

    return BackboneSpec.from_params(section(params, "features", ("backbone", "image_size")))


def features(params: dict) -> tuple[dict, int]:
    """Extract and cache the backbone pyramid of every manifest image the cache lacks: (index, images extracted)."""
    from .data.manifest import read_manifest
    from .features import extract_features

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


def _manifest_and_cache(params: dict):
    from .data.manifest import read_manifest
    from .features import FeatureCache

    manifest = read_manifest(section(params, "prepare", ("manifest",))["manifest"])
    return manifest, FeatureCache(section(params, "features", ("cache",))["cache"], backbone_spec(params), manifest)


def train(params: dict, stop_after_epoch: int | None = None) -> Path:
    """Train the configured model on the train split (all categories mixed, no labels) and save it."""
    from .backbones import resolve_device
    from .bundle import ModelBundle
    from .models import config_from_params, create_model
    from .features import CachedFeatures
    from .train import Checkpoint, TrainConfig, fingerprint, seed_everything, source_digest, train_model, write_history

    manifest, cache = _manifest_and_cache(params)
    name, config = config_from_params(
        section(params, "model", ("name",)), in_channels=_channels(cache), image_size=cache.spec.image_size
    )
    train_section = dict(section(params, "train"))
    with_onnx = bool(train_section.pop("onnx", False))  # not a training setting: what the bundle carries
    workers = int(train_section.pop("loader_workers", 0))  # nor this: how fast batches are read
    cfg = TrainConfig.from_params(train_section, name)
    seed_everything(cfg.seed)
    model = create_model(name, config)
    train_ids = manifest.loc[manifest.split == "train", "image_id"].tolist()
    features = CachedFeatures(cache, train_ids)
    out = section(params, "outputs", ("model", "train_log", "checkpoints"))
    key = fingerprint(name, dataclasses.asdict(config), cfg.__dict__, cache.index["key"], source_digest())
    checkpoint = Checkpoint(Path(out["checkpoints"]) / key, key)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    history = train_model(
        model,
        features,
        cfg,
        device,
        checkpoint,
        lambda h: write_history(out["train_log"], h),
        stop_after_epoch=stop_after_epoch,
        workers=workers,
    )
    write_history(out["train_log"], history)  # also when a finished checkpoint was restored
    if model.trainable and len(history) < cfg.epochs:
        raise RuntimeError(f"training stopped after epoch {len(history)} of {cfg.epochs}; run again to resume")
    thresholds = calibrate_thresholds(params, model, manifest, cache, device)
    # the extractor that made the cached features goes into the bundle, so serving needs no weights source
    ModelBundle.write(
        out["model"],
        model,
        name,
        config,
        thresholds,
        cache.spec.build(),
        extra={
            "backbone": cache.index["backbone"],
            "feature_cache_key": cache.index["key"],
            "train": cfg.__dict__,
            "train_images": len(train_ids),
            "epochs": cfg.epochs if model.trainable else 0,
        },
        onnx=with_onnx,
    )
    timing.record(
        params,
        "train",
        seconds=time.perf_counter() - started,
        training_seconds=sum(row.get("seconds", 0.0) for row in history),
        seconds_per_epoch=[row.get("seconds") for row in history],
    )
    return Path(out["model"])


def calibrate_thresholds(params: dict, model, manifest: pd.DataFrame, cache, device) -> dict:
    """Per-category thresholds from the validation split (normal images never trained on)."""
    from .scoring import score_batches
    from .thresholds import Calibration

    p = section(params, "thresholds", ("target_frr", "pixel_fpr"))
    val = manifest[manifest.split == "val"].reset_index(drop=True)
    calibration = Calibration(val, float(p["target_frr"]), float(p["pixel_fpr"]))
    for _, scored in score_batches(model, cache, val.image_id.tolist(), device, progress=False):
        calibration.add(scored.scores, scored.maps)
    return calibration.result()


def _channels(cache) -> list[int]:
    first = cache.get([next(iter(cache.index["entries"]))])
    return [int(f.shape[1]) for f in first]


def evaluate(params: dict) -> dict:
    """Score the test split; write metrics (per category + mean), decisions at the calibrated thresholds,
    inference speed, plots and the markdown report."""
    from .backbones import resolve_device
    from .bundle import ModelBundle
    from .io import write_json
    from .plots import curve_data
    from .report import write_report

    manifest, cache = _manifest_and_cache(params)
    out = section(params, "outputs", ("model", "metrics", "scores", "plots", "report"))
    p = section(params, "evaluate")
    device = resolve_device(str(p.get("device", "auto")))
    bundle = ModelBundle(out["model"])
    model, meta, thresholds = bundle.load_model(device), bundle.meta, bundle.thresholds
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    limit = p.get("exact_pixel_limit")
    metrics, scores, extras = measure_test_split(
        model,
        cache,
        test,
        device,
        int(p.get("batch_size", 16)),
        float(p.get("max_fpr", 0.3)),
        None if limit is None else int(limit),
    )
    metrics["at_threshold"] = decisions(test, scores, thresholds)
    metrics["dataset"] = dataset_identity(test)
    metrics["epochs"] = meta.get("epochs")
    metrics["model"] = meta["model"]
    write_json(out["metrics"], metrics)
    write_scores(test, scores, extras, out["scores"])
    plot_paths = make_plots(test, scores, metrics, thresholds, Path(out["plots"]), model, cache, device)
    curve_data(test, scores, metrics, Path(out.get("curves") or Path(out["metrics"]).parent / "curves"))
    write_report(params, meta, metrics, manifest, plot_paths, out["report"])
    timing.record(params, "evaluate", fps=inference_fps(bundle, model, test, device))
    return metrics


def dataset_identity(test: pd.DataFrame) -> dict:
    """Which data the metrics were measured on: the categories and a fingerprint of the evaluation split (its
    images' contents and labels, not their paths: the same data in another clone has the same fingerprint). New
    normal images go to train/val, so retraining keeps the fingerprint; another data set has another one."""
    import hashlib

    lines = sorted(f"{r.category}\t{r.label}\t{r.defect_type}\t{r.sha256}" for r in test.itertuples())
    return {
        "categories": sorted(test.category.unique().tolist()),
        "test_images": len(test),
        "fingerprint": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
    }


def measure_test_split(
    model, cache, test: pd.DataFrame, device, batch_size: int, max_fpr: float, exact_limit: int | None
) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """Metrics of the test rows, scored one category at a time and a batch at a time (each batch of maps is
    reduced and dropped: pixel metrics hold at most ``exact_limit`` pixels, then go binned), the score of every
    row and its per-image extras (e.g. concept ids)."""
    from .metrics import PixelMetrics, category_metrics, summarize
    from .scoring import score_batches

    scores = np.full(len(test), np.nan)
    extras: dict[str, np.ndarray] = {}
    per_category, binned = {}, []
    for category, rows in test.groupby("category", sort=True):
        pixels = PixelMetrics(exact_limit)
        for positions, scored in score_batches(model, cache, rows.image_id.tolist(), device, batch_size):
            batch = rows.iloc[positions]
            scores[batch.index] = scored.scores
            for key, values in scored.extras.items():
                if values.ndim == 1:
                    extras.setdefault(key, np.zeros(len(test), dtype=values.dtype))[batch.index] = values
            pixels.add(scored.maps, ground_truth_masks(batch, scored.maps.shape[-1]))
        in_category = rows.index.to_numpy()
        per_category[category] = category_metrics(
            test.label.to_numpy()[in_category], scores[in_category], pixels, max_fpr
        )
        if pixels.binned:
            binned.append(category)
    return summarize(per_category, binned), scores, extras


def ground_truth_masks(test: pd.DataFrame, size: int) -> np.ndarray:
    """The ground-truth masks of the test rows at the maps' size (all zero for normal images)."""
    from .data.images import load_mask, resize_mask

    return np.stack(
        [
            resize_mask(load_mask(m or None, (int(w), int(h))), size)
            for m, w, h in zip(test.mask_path, test.width, test.height)
        ]
    )


def decisions(test: pd.DataFrame, scores: np.ndarray, thresholds: dict) -> dict:
    """Per category: precision, recall, F1 and false-reject rate at the calibrated image threshold, and the F1
    an oracle threshold would reach (what calibration costs)."""
    from .metrics import f1_max
    from .thresholds import decision_metrics, threshold_for

    result = {}
    for category, rows in test.groupby("category"):
        idx, labels = rows.index.to_numpy(), rows.label.to_numpy()
        at = decision_metrics(labels, scores[idx], threshold_for(thresholds, category))
        at["oracle_f1max"] = f1_max(labels, scores[idx])[0]
        result[category] = at
    return result


def write_scores(test: pd.DataFrame, scores: np.ndarray, extras: dict[str, np.ndarray], path: str) -> None:
    """metrics/scores.csv: one row per test image with its score and the model's per-image extras."""
    from .io import atomic_path

    frame = test[["image_id", "category", "label", "defect_type"]].copy()
    frame["score"] = scores
    for key, values in extras.items():
        frame[key] = values
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.8g")


def make_plots(test, scores, metrics: dict, thresholds: dict, plot_dir: Path, model, cache, device) -> list[Path]:
    """Curves, bars and histograms from the scores; the gallery images' maps are scored again (a few images)."""
    from . import plots
    from .scoring import score_cached

    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("gallery_*.png"):
        stale.unlink()
    picks = plots.gallery_picks(test, scores)
    shown = sorted({i for category_picks in picks.values() for _, i in category_picks})
    maps, masks = {}, {}
    if shown:
        scored = score_cached(model, cache, test.image_id[shown].tolist(), device, progress=False)
        maps = dict(zip(shown, scored.maps))
        masks = dict(zip(shown, ground_truth_masks(test.iloc[shown], scored.maps.shape[-1])))
    return [
        *plots.curves(test, scores, plot_dir),
        plots.metric_bars(metrics, plot_dir / "metrics_per_category.png"),
        plots.score_histograms(test, scores, thresholds, plot_dir / "score_histograms.png"),
        *plots.gallery(test, scores, picks, maps, masks, thresholds, plot_dir),
    ]


def inference_fps(bundle, model, test: pd.DataFrame, device, images: int = 32, batch_size: int = 16) -> float:
    """Images per second of the whole inference (decode + resize + backbone + model + maps), after a warm-up."""
    from .features import load_batch
    from .scoring import score_images

    spec = bundle.spec
    backbone = bundle.load_backbone(device)
    paths = test.path.tolist()[:images]
    score_images(model, backbone, load_batch(paths[:2], spec.image_size), device)
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        score_images(model, backbone, load_batch(paths[start : start + batch_size], spec.image_size), device)
    return len(paths) / (time.perf_counter() - started)


class DataValidationError(RuntimeError):
    """The data failed the validation gate; the message lists the failed checks and files."""


def validate(params: dict) -> "object":
    """Run the Great Expectations suite on the manifest; write the result JSON and Data Docs; fail loudly."""
    from .data.manifest import read_manifest
    from .io import write_json
    from .validation import validate_manifest

    manifest = read_manifest(section(params, "prepare", ("manifest",))["manifest"])
    p = section(params, "validate", ("result", "docs"))
    started = time.perf_counter()
    report = validate_manifest(manifest, p, p["docs"])
    write_json(
        Path(p["docs"]) / "result.json", {"failures": [f.__dict__ for f in report.failures], "gx_result": report.result}
    )
    write_json(
        p["result"],
        {
            "success": report.success,
            "images": len(manifest),
            "failed_checks": len(report.errors),
            "warnings": len(report.failures) - len(report.errors),
        },
    )
    timing.record(params, "validate", seconds=time.perf_counter() - started)
    if not report.success:
        lines = [
            f"  {f.check}: {f.count} rows - {f.reason}; e.g. {'; '.join(f.described()) or f.column}"
            for f in report.errors
        ]
        error = DataValidationError("data validation failed (see " + p["docs"] + "/index.html):\n" + "\n".join(lines))
        error.report = report
        raise error
    return report


def export(params: dict) -> dict:
    """Store the trained model (content tag) in the BentoML store; promote it to champion only from a committed
    run on the promotion branch, and only if not worse than the champion."""
    from .io import read_json, write_json
    from .model_store import export as export_model

    out = section(params, "outputs", ("model", "metrics", "export"))
    section(params, "export", ("tolerance_mean", "tolerance_category"))
    record = export_model(out["model"], read_json(Path(out["metrics"])), params)
    write_json(out["export"], record)
    return record


def promote(params: dict, tag: str, new_line: bool = False) -> dict:
    """Make a stored model the champion on purpose (the same not-worse rule as the export stage); ``new_line``:
    start a champion line with it."""
    from .model_store import promote_explicitly

    section(params, "export", ("tolerance_mean", "tolerance_category"))
    return promote_explicitly(tag, params, new_line)
