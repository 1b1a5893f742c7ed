"""evaluate: the packaged model on the test split: metrics per category and mean, decisions at the calibrated
thresholds, the data set measured on, inference speed, plots and the markdown report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import timing
from ..config import section
from .common import manifest_and_cache


def run(params: dict) -> dict:
    """Score the test split; write metrics (per category + mean), decisions at the calibrated thresholds,
    inference speed, plots and the markdown report."""
    from ..backbones import resolve_device
    from ..bundle import ModelBundle
    from ..io import write_json
    from ..plots import curve_data
    from ..report import write_report

    manifest, cache = manifest_and_cache(params)
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
    from ..metrics import PixelMetrics, category_metrics, summarize
    from ..scoring import score_batches

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
    from ..data.images import load_mask, resize_mask

    return np.stack(
        [
            resize_mask(load_mask(m or None, (int(w), int(h))), size)
            for m, w, h in zip(test.mask_path, test.width, test.height)
        ]
    )


def decisions(test: pd.DataFrame, scores: np.ndarray, thresholds: dict) -> dict:
    """Per category: precision, recall, F1 and false-reject rate at the calibrated image threshold, and the F1
    an oracle threshold would reach (what calibration costs)."""
    from ..metrics import f1_max
    from ..thresholds import decision_metrics, threshold_for

    result = {}
    for category, rows in test.groupby("category"):
        idx, labels = rows.index.to_numpy(), rows.label.to_numpy()
        at = decision_metrics(labels, scores[idx], threshold_for(thresholds, category))
        at["oracle_f1max"] = f1_max(labels, scores[idx])[0]
        result[category] = at
    return result


def write_scores(test: pd.DataFrame, scores: np.ndarray, extras: dict[str, np.ndarray], path: str) -> None:
    """metrics/scores.csv: one row per test image with its score and the model's per-image extras."""
    from ..io import atomic_path

    frame = test[["image_id", "category", "label", "defect_type"]].copy()
    frame["score"] = scores
    for key, values in extras.items():
        frame[key] = values
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.8g")


def make_plots(test, scores, metrics: dict, thresholds: dict, plot_dir: Path, model, cache, device) -> list[Path]:
    """Curves, bars and histograms from the scores; the gallery images' maps are scored again (a few images)."""
    from .. import plots
    from ..scoring import score_cached

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
    from ..features import load_batch
    from ..scoring import score_images

    spec = bundle.spec
    backbone = bundle.load_backbone(device)
    paths = test.path.tolist()[:images]
    score_images(model, backbone, load_batch(paths[:2], spec.image_size), device)
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        score_images(model, backbone, load_batch(paths[start : start + batch_size], spec.image_size), device)
    return len(paths) / (time.perf_counter() - started)
