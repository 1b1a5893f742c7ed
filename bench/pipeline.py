"""Speed and peak memory of the pipeline's heavy steps on the default dataset: feature extraction, training per
epoch for every model, and the evaluator's metrics (AUPRO included). Each part runs in its own process so its
peak RSS is its own. Needs `make run` (manifest, feature cache and a trained model).

    python bench/pipeline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_features(params: dict, repeats: int) -> dict:
    import pandas as pd
    import torch

    from vqflow.features import BackboneSpec, load_batch

    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    paths = manifest.path.tolist()[:64]
    spec = BackboneSpec.from_params(params["features"])
    backbone = spec.build()

    def extract():
        with torch.inference_mode():
            for start in range(0, len(paths), 16):
                backbone(load_batch(paths[start : start + 16], spec.image_size))

    extract()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        extract()
        times.append(time.perf_counter() - started)
    return {"images": len(paths), "images_per_s": len(paths) / statistics.median(times), "peak_rss_mib": _peak_mib()}


def bench_train(params: dict, name: str, epochs: int) -> dict:
    """Per-epoch time of the real training loop on the cached training features (after one warm-up epoch)."""
    import torch

    from vqflow.stages.common import manifest_and_cache
    from vqflow.models import config_from_params, create_model
    from vqflow.train import TrainConfig, train_model

    manifest, cache = manifest_and_cache(params)
    features = cache.get(manifest.loc[manifest.split == "train", "image_id"].tolist())
    _, config = config_from_params(
        {**params["model"], "name": name},
        in_channels=[int(f.shape[1]) for f in features],
        image_size=cache.spec.image_size,
    )
    cfg = TrainConfig.from_params({**params["train"], "epochs": epochs + 1, "device": "cpu"}, name)
    history = train_model(create_model(name, config), features, cfg, torch.device("cpu"), progress=False)
    per_epoch = statistics.median(row["seconds"] for row in history[1:])
    configured = TrainConfig.from_params(params["train"], name).epochs
    return {
        "images": len(features[0]),
        "seconds_per_epoch": per_epoch,
        "epochs": configured,
        "seconds_total": per_epoch * configured,
        "peak_rss_mib": _peak_mib(),
    }


def bench_metrics(params: dict, repeats: int) -> dict:
    import numpy as np
    import torch

    from vqflow.stages.common import manifest_and_cache
    from vqflow.data.images import load_mask, resize_mask
    from vqflow.metrics import evaluate_categories
    from vqflow.weights import load_model
    from vqflow.scoring import score_cached

    manifest, cache = manifest_and_cache(params)
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    model, _ = load_model(params["outputs"]["model"])
    scored = score_cached(model, cache, test.image_id.tolist(), torch.device("cpu"), progress=False)
    size = scored.maps.shape[-1]
    masks = np.stack(
        [
            resize_mask(load_mask(m or None, (int(w), int(h))), size)
            for m, w, h in zip(test.mask_path, test.width, test.height)
        ]
    )
    args = (test.category.to_numpy(), test.label.to_numpy(), scored.scores, scored.maps, masks)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        evaluate_categories(*args, float(params["evaluate"].get("max_fpr", 0.3)))
        times.append(time.perf_counter() - started)
    return {"images": len(test), "map_size": size, "seconds": statistics.median(times), "peak_rss_mib": _peak_mib()}


def _worker(part: str, args) -> dict:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if part == "features":
        return bench_features(params, args.repeats)
    if part == "metrics":
        return bench_metrics(params, args.repeats)
    return bench_train(params, part.split(":", 1)[1], args.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per model (after one warm-up epoch)")
    parser.add_argument("--models", nargs="+", help="default: every registered model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return

    sys.path.insert(0, str(ROOT))
    from bench.common import registered_models, write_results

    args.models = args.models or registered_models()

    def run(part: str) -> dict:
        print(f"-- {part}", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", part, "--repeats", str(args.repeats), "--epochs", str(args.epochs)],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = {
        "features": run("features"),
        "metrics": run("metrics"),
        "train": {name: run(f"train:{name}") for name in args.models},
    }
    f, m = results["features"], results["metrics"]
    lines = [
        "| step | speed | peak RSS MiB |",
        "|---|---:|---:|",
        f"| feature extraction (decode + backbone, batch 16) | {f['images_per_s']:.1f} images/s | {f['peak_rss_mib']:.0f} |",
        f"| metrics: 7 metrics x {m['images']} test images at {m['map_size']} px, AUPRO incl. | {m['seconds']:.2f} s | "
        f"{m['peak_rss_mib']:.0f} |",
    ]
    for name, t in results["train"].items():
        lines.append(
            f"| train {name} ({t['images']} images) | {t['seconds_per_epoch']:.1f} s/epoch, "
            f"{t['seconds_total']:.0f} s for {t['epochs']} epochs | {t['peak_rss_mib']:.0f} |"
        )
    print(Path(write_results("pipeline", results, "\n".join(lines))).read_text())


if __name__ == "__main__":
    main()
