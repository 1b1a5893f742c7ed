"""Inference speed: images/s at batch 1 and 16 (backbone + model + maps) and where the time goes, per model.

    python bench/inference.py                       # this checkout
    python bench/inference.py --baseline-rev 55c53bc   # also the same measurement with the library of an
                                                   # older commit (a git worktree), and the scores compared

Input: the first test images of the manifest, decoded once (decoding is timed separately). Timing: a warm-up
call, then the median of ``--repeats`` runs. The trained model of ``outputs.model`` is measured for the
score comparison; the other models are built from params.yaml (speed does not depend on trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(params: dict, repeats: int, models: list[str], scores_out: Path | None) -> dict:
    """Run in the process whose ``vqflow`` is the library under test (this checkout or a baseline worktree)."""
    import numpy as np
    import pandas as pd
    import torch

    from vqflow.features import BackboneSpec, load_batch
    from vqflow.weights import load_model

    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    test = manifest[manifest.split == "test"]
    spec = BackboneSpec.from_params(params["features"])
    paths = test.path.tolist()[:16]
    decode_s = _median_seconds(lambda: load_batch(paths, spec.image_size), repeats)
    images = load_batch(paths, spec.image_size)
    backbone = spec.build()
    trained, meta = load_model(params["outputs"]["model"])
    results = {"decode_ms_per_image": 1000 * decode_s / len(paths), "models": {}}
    with torch.inference_mode():
        features = backbone(images)
        for batch in (1, 16):
            x = images[:batch]
            results[f"backbone_ms_batch{batch}"] = 1000 * _median_seconds(lambda: backbone(x), repeats)
        for name in models:
            model = trained if name == meta["model"] else _fresh(name, params, features)
            model.eval()
            row = {}
            for batch in (1, 16):
                f = [t[:batch] for t in features]
                x = images[:batch]
                model_s = _median_seconds(lambda: model.predict(f), repeats)
                total_s = _median_seconds(lambda: model.predict(backbone(x)), repeats)
                row[f"batch{batch}"] = {
                    "images_per_s": batch / total_s,
                    "ms_per_image": 1000 * total_s / batch,
                    "model_ms": 1000 * model_s,
                    "backbone_ms": 1000 * (total_s - model_s),
                }
            results["models"][name] = row
        if scores_out is not None:
            scores = []
            for start in range(0, len(test), 16):
                batch = load_batch(test.path.tolist()[start : start + 16], spec.image_size)
                scores.append(trained.predict(backbone(batch)).scores.numpy())
            np.save(scores_out, np.concatenate(scores))
    results["trained_model"] = meta["model"]
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["torch_threads"] = torch.get_num_threads()
    return results


def measure_onnx(params: dict, repeats: int, int8: bool) -> dict:
    """The trained bundle's model.onnx in ONNX Runtime (fp32, and int8 from dynamic quantisation): images/s at
    batch 1 and 16, and on the whole test set the largest difference from torch and the image AUROC."""
    import numpy as np
    import pandas as pd
    import torch

    from vqflow.bundle import ModelBundle
    from vqflow.features import load_batch
    from vqflow.metrics import auroc
    from vqflow.onnx_graph import OnnxScorer
    from vqflow.scoring import score_images

    bundle = ModelBundle(params["outputs"]["model"])
    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    size = bundle.spec.image_size
    batches = [load_batch(test.path.tolist()[s : s + 16], size) for s in range(0, len(test), 16)]
    model, backbone = bundle.load_model(), bundle.load_backbone()
    reference = [score_images(model, backbone, b, torch.device("cpu")) for b in batches]
    variants = {"fp32": bundle.onnx_path}
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        variants["int8 (dynamic)"] = Path(tempfile.mkdtemp()) / "model.int8.onnx"
        quantize_dynamic(bundle.onnx_path, variants["int8 (dynamic)"], weight_type=QuantType.QInt8)

    def mean_auroc(scores: np.ndarray) -> float:
        return float(
            np.mean(
                [auroc(test.label[test.category == c], scores[test.category == c]) for c in sorted(set(test.category))]
            )
        )

    torch_scores = np.concatenate([r.scores for r in reference])
    rows = {"torch": {"image_auroc": mean_auroc(torch_scores)}}
    for name, path in variants.items():
        scorer = OnnxScorer(path, threads=torch.get_num_threads())
        row = {"file_mib": path.stat().st_size / 2**20}
        for batch in (1, 16):
            x = batches[0][:batch]
            seconds = _median_seconds(lambda: scorer.run(x), repeats)
            row[f"batch{batch}"] = {"images_per_s": batch / seconds, "ms_per_image": 1000 * seconds / batch}
        scored = [scorer.score(b) for b in batches]
        scores = np.concatenate([s.scores for s in scored])
        row["max_score_difference"] = float(np.abs(scores - torch_scores).max())
        row["max_relative_score_difference"] = float(
            np.max(np.abs(scores - torch_scores) / np.maximum(1.0, np.abs(torch_scores)))
        )
        row["max_map_difference"] = max(float(np.abs(s.maps - r.maps).max()) for s, r in zip(scored, reference))
        row["image_auroc"] = mean_auroc(scores)
        rows[name] = row
    return {"model": bundle.meta["model"], "test_images": len(test), "variants": rows}


def _fresh(name: str, params: dict, features):
    from vqflow.models import config_from_params, create_model

    _, config = config_from_params(
        {**params["model"], "name": name},
        in_channels=[int(f.shape[1]) for f in features],
        image_size=int(params["features"]["image_size"]),
    )
    model = create_model(name, config)
    model.initialize([f.clone() for f in features])
    return model


def run_baseline(rev: str, args) -> tuple[dict, Path]:
    """The same measurement with the ``vqflow`` package of commit ``rev`` (checked out in a worktree)."""
    tmp = Path(tempfile.mkdtemp(prefix="vqflow-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tmp / "tree"), rev], cwd=ROOT, check=True, capture_output=True
    )
    try:
        out, scores = tmp / "result.json", tmp / "scores.npy"
        env = {**os.environ, "PYTHONPATH": str(tmp / "tree")}
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                str(out),
                "--scores-out",
                str(scores),
                "--repeats",
                str(args.repeats),
                "--params",
                str(tmp / "tree/params.yaml"),
                "--models",
                *args.models,
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
        return json.loads(out.read_text()), scores
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, capture_output=True)


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", help="default: every registered model")
    parser.add_argument("--baseline-rev", help="also measure the library of this commit and compare the scores")
    parser.add_argument(
        "--params", type=Path, default=ROOT / "params.yaml", help="model knobs (a baseline uses its own)"
    )
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 (dynamic quantisation) row")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = yaml.safe_load(args.params.read_text())

    if args.worker:  # inside the baseline's environment: measure and write JSON only
        args.worker.write_text(json.dumps(measure(params, args.repeats, args.models, args.scores_out)))
        return

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.common import registered_models, write_results

    args.models = args.models or registered_models()

    current_scores = Path(tempfile.mkdtemp()) / "scores.npy"
    current = measure(params, args.repeats, args.models, current_scores)
    payload = {"current": current}
    lines = [
        "| model | batch | images/s | ms/image | backbone ms (total - model) | model ms |"
        + (" before images/s |" if args.baseline_rev else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if args.baseline_rev else ""),
    ]
    baseline = None
    if args.baseline_rev:
        baseline, baseline_scores = run_baseline(args.baseline_rev, args)
        diff = float(np.abs(np.load(current_scores) - np.load(baseline_scores)).max())
        payload.update(baseline=baseline, baseline_rev=args.baseline_rev, max_abs_score_difference=diff)
        if diff > 1e-5:
            raise SystemExit(f"scores differ from {args.baseline_rev} by {diff:.3g} (> 1e-5)")
    for name, row in current["models"].items():
        for batch in (1, 16):
            r = row[f"batch{batch}"]
            line = (
                f"| {name} | {batch} | {r['images_per_s']:.1f} | {r['ms_per_image']:.1f} | {r['backbone_ms']:.0f} | "
                f"{r['model_ms']:.0f} |"
            )
            if baseline is not None:
                line += f" {baseline['models'][name][f'batch{batch}']['images_per_s']:.1f} |"
            lines.append(line)
    notes = [
        f"\nDecoding + resizing: {current['decode_ms_per_image']:.1f} ms/image (not in images/s). "
        f"Peak RSS {current['peak_rss_mib']:.0f} MiB. Times are for one batch (median of {args.repeats})."
    ]
    if baseline is not None:
        notes.append(
            f"Before = the library at {args.baseline_rev}; the trained {current['trained_model']} model's test "
            f"scores differ by at most {payload['max_abs_score_difference']:.2g}."
        )
    onnx = measure_onnx(params, args.repeats, int8=not args.no_int8)
    payload["onnx"] = onnx
    torch_row = current["models"].get(onnx["model"])
    lines += [
        "",
        f"Runtimes for the trained {onnx['model']} (`serve.runtime`; {torch.get_num_threads()} threads each), whole "
        f"graph from decoded image to score and map; differences and image AUROC over the {onnx['test_images']} "
        "test images:",
        "",
        "| runtime | images/s batch 1 | images/s batch 16 | max score diff vs torch (relative) | max map diff | "
        "mean image AUROC |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if torch_row:
        lines.append(
            f"| torch | {torch_row['batch1']['images_per_s']:.1f} | {torch_row['batch16']['images_per_s']:.1f} | - | - "
            f"| {100 * onnx['variants']['torch']['image_auroc']:.2f} |"
        )
    for name, r in onnx["variants"].items():
        if name == "torch":
            continue
        lines.append(
            f"| ONNX Runtime {name} | {r['batch1']['images_per_s']:.1f} | {r['batch16']['images_per_s']:.1f} | "
            f"{r['max_relative_score_difference']:.1e} | {r['max_map_difference']:.1e} | {100 * r['image_auroc']:.2f} |"
        )
    print(Path(write_results("inference", payload, "\n".join(lines) + "\n" + " ".join(notes))).read_text())


if __name__ == "__main__":
    main()
