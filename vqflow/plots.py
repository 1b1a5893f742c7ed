"""The pictures of an evaluation: ROC and PR curves, metric bars, score histograms, a gallery of mistakes.

The pictures are static PNGs (DVC renders image plots in `dvc plots show/diff` HTML without any network access).
The same curves are also written as data (`curve_data`), which `dvc plots diff` draws with one line per commit.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable, small), not glyph paths
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from .data.images import image_to_array, load_image  # noqa: E402
from .io import atomic_dir, atomic_path  # noqa: E402
from .metrics import REPORTED  # noqa: E402
from .thresholds import threshold_for  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _category_curves(test: pd.DataFrame, scores: np.ndarray):
    """Per category with both classes: (category, fpr, tpr, precision, recall) of the image scores."""
    for category, rows in test.groupby("category"):
        labels, s = rows.label.to_numpy(), scores[rows.index.to_numpy()]
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, s)
        precision, recall, _ = precision_recall_curve(labels, s)
        yield category, fpr, tpr, precision, recall


def curves(test: pd.DataFrame, scores: np.ndarray, out_dir: Path) -> list[Path]:
    """roc.png and pr.png: one line per category (image level)."""
    fig_roc, ax_roc = plt.subplots(figsize=(5, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(5, 5))
    for category, fpr, tpr, precision, recall in _category_curves(test, scores):
        ax_roc.plot(fpr, tpr, label=category)
        ax_pr.plot(recall, precision, label=category)
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="Image ROC per category")
    ax_pr.set(xlabel="recall", ylabel="precision", title="Image precision-recall per category", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    return [_save(fig_roc, out_dir / "roc.png"), _save(fig_pr, out_dir / "pr.png")]


def curve_data(test: pd.DataFrame, scores: np.ndarray, metrics: dict, out_dir: Path, bins: int = 20) -> Path:
    """CSV files DVC plots from: per category ``roc/<c>.csv`` (fpr, tpr), ``pr/<c>.csv`` (recall, precision),
    ``histogram/<c>_normal.csv`` and ``<c>_defective.csv`` (score, count: bin centres over the category's
    score range), and ``per_category.csv`` (category, each metric in %)."""
    with atomic_dir(out_dir) as tmp:
        for kind in ("roc", "pr", "histogram"):
            (tmp / kind).mkdir()
        for category, rows in test.groupby("category"):
            labels, s = rows.label.to_numpy(), scores[rows.index.to_numpy()]
            edges = np.linspace(s.min(), s.max() + 1e-9, bins + 1)
            centres = (edges[:-1] + edges[1:]) / 2
            for label, kind in ((0, "normal"), (1, "defective")):
                counts = np.histogram(s[labels == label], edges)[0]
                pd.DataFrame({"score": centres, "count": counts}).to_csv(
                    tmp / "histogram" / f"{category}_{kind}.csv", index=False, float_format="%.6g"
                )
        for category, fpr, tpr, precision, recall in _category_curves(test, scores):
            pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(
                tmp / "roc" / f"{category}.csv", index=False, float_format="%.6g"
            )
            pd.DataFrame({"recall": recall, "precision": precision}).to_csv(
                tmp / "pr" / f"{category}.csv", index=False, float_format="%.6g"
            )
        pd.DataFrame(
            [{"category": c, **{n: 100 * m[n] for n in REPORTED}} for c, m in metrics["per_category"].items()]
        ).to_csv(tmp / "per_category.csv", index=False, float_format="%.4f")
    return out_dir


def metric_bars(metrics: dict, out_path: Path) -> Path:
    """Per-category bar chart of the seven metrics (+ mAD)."""
    categories = list(metrics["per_category"])
    names = list(REPORTED)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(categories) + 3), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [100 * metrics["per_category"][c][name] for c in categories]
        ax.bar(np.arange(len(categories)) + i * width, values, width, label=name.replace("_", " "))
    ax.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories)
    ax.set(ylabel="%", ylim=(0, 100), title="Metrics per category")
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)


def score_histograms(test: pd.DataFrame, scores: np.ndarray, thresholds: dict, out_path: Path) -> Path:
    """Score histograms of normal vs defective test images per category, with the calibrated threshold."""
    groups = list(test.groupby("category"))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3), squeeze=False)
    for ax, (category, rows) in zip(axes[0], groups):
        s = scores[rows.index.to_numpy()]
        bins = np.linspace(s.min(), s.max() + 1e-9, 25)
        ax.hist(s[rows.label.to_numpy() == 0], bins, alpha=0.6, label="normal", color="tab:green")
        ax.hist(s[rows.label.to_numpy() == 1], bins, alpha=0.6, label="defective", color="tab:red")
        ax.axvline(threshold_for(thresholds, category), color="k", ls="--", label="threshold")
        ax.set(title=category, xlabel="anomaly score")
        ax.legend(fontsize=7)
    return _save(fig, out_path)


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    cmap = plt.get_cmap("jet")
    span = max(float(heat.max() - heat.min()), 1e-12)
    colored = cmap((heat - heat.min()) / span)[..., :3]
    out = 0.55 * image + 0.45 * colored
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    out[edge] = (1.0, 1.0, 1.0)
    return np.clip(out, 0, 1)


def gallery_picks(test: pd.DataFrame, scores: np.ndarray, per_kind: int = 2) -> dict[str, list[tuple[str, int]]]:
    """Per category, the rows a gallery shows: the worst false positives (highest-scoring normal images) and
    false negatives (lowest-scoring defective images), as (kind, row position)."""
    picks = {}
    for category, rows in test.groupby("category"):
        idx = rows.index.to_numpy()
        normal = idx[rows.label.to_numpy() == 0]
        defective = idx[rows.label.to_numpy() == 1]
        chosen = [("false positive?", int(i)) for i in normal[np.argsort(-scores[normal])][:per_kind]]
        chosen += [("false negative?", int(i)) for i in defective[np.argsort(scores[defective])][:per_kind]]
        if chosen:
            picks[category] = chosen
    return picks


def gallery(
    test: pd.DataFrame,
    scores: np.ndarray,
    picks: dict[str, list[tuple[str, int]]],
    maps: dict[int, np.ndarray],
    masks: dict[int, np.ndarray],
    thresholds: dict,
    out_dir: Path,
) -> list[Path]:
    """gallery_<category>.png of the ``gallery_picks`` rows: input, ground truth, anomaly-map overlay, predicted
    mask; ``maps`` and ``masks`` hold the picked rows' (by row position)."""
    paths = []
    for category, chosen in picks.items():
        fig, axes = plt.subplots(len(chosen), 4, figsize=(10, 2.6 * len(chosen)), squeeze=False)
        for row, (kind, i) in zip(axes, chosen):
            image = image_to_array(load_image(test.path[i]), maps[i].shape[-1]).transpose(1, 2, 0)
            predicted = maps[i] > threshold_for(thresholds, category, "pixel")
            decision = "anomalous" if scores[i] > threshold_for(thresholds, category) else "normal"
            panels = [
                (image, f"{test.defect_type[i]} | score {scores[i]:.3f}"),
                (masks[i], "ground truth"),
                (overlay(image, maps[i], predicted), f"{kind} -> {decision}"),
                (predicted, "predicted mask"),
            ]
            for ax, (picture, title) in zip(row, panels):
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.suptitle(f"{category}: worst normal images (top) and defective images (bottom)", fontsize=10)
        paths.append(_save(fig, out_dir / f"gallery_{category}.png"))
    return paths


def loss_curves(histories: dict[str, list[dict]], path: Path, term: str = "flow") -> Path:
    """Per-epoch training loss of several runs (train_log.json rows), one line each: has training converged?

    ``term`` is the logged loss term to draw (falls back to ``loss`` for runs that do not log it); runs without
    epochs (fitted in one pass) are skipped. PNG or SVG by the file suffix.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in histories.items():
        rows = [r for r in rows if r.get("epoch", 0) > 0 and (term in r or "loss" in r)]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r.get(term, r.get("loss")) for r in rows], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"training {term} loss (per epoch mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
