"""Peak memory and time per image of features, training and evaluation as the dataset grows (issue 18).

    python bench/scale.py [--sizes 2000 10000 20000] [--image-size 128] [--epochs 2]

For each size N the synthetic generator makes N normal training images (4 categories; 10 % of them held out as
validation) and N/25 test images at ``--image-size`` px in bench/.work/scale/N (never committed); the default
model (params.yaml) is trained for ``--epochs``. Every stage runs in a process of its own, so its peak RSS is its
own. Then 10 new normal images are added (mirrored training images) and prepare + features re-run: the last
column says how many images the features stage extracted. Target: peak RSS of train flat within 25 % and at
most 4 GB; time per image flat within 25 %; 10 extracted.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402

CATEGORIES = ["fabric", "wood", "washer", "chip"]
MEASURED = ("features", "train", "evaluate")


def size_params(base: dict, work: Path, images: int, image_size: int, epochs: int) -> dict:
    params = copy.deepcopy(base)
    per_category = images // len(CATEGORIES)
    params["generate"].update(
        root=str(work / "data/synthetic"),
        categories=CATEGORIES,
        train_per_category=per_category,
        test_good_per_category=max(2, per_category // 50),
        test_per_defect=max(1, per_category // 200),
        size=image_size,
    )
    params["prepare"].update(
        sources=[{"kind": "mvtec", "root": str(work / "data/synthetic")}], manifest=str(work / "data/manifest.csv")
    )
    params["features"].update(image_size=image_size, cache=str(work / "data/features"))
    params["train"].update(epochs=epochs, lr_decay_epochs=[], onnx=False, checkpoint_every=epochs)
    params["outputs"] = {key: str(work / Path(value).name) for key, value in params["outputs"].items()}
    return params


def run_stage(work: Path, stage: str) -> dict:
    """One stage in a process of its own: seconds and that process's peak RSS."""
    result = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--work", str(work)], capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"{stage} in {work} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def stage_main(stage: str, work: Path) -> None:
    from vqflow import stages

    params = yaml.safe_load((work / "params.yaml").read_text())
    started = time.perf_counter()
    getattr(stages, stage)(params)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak}))


def measure(base: dict, images: int, args) -> dict:
    import pandas as pd

    work = ROOT / "bench/.work/scale" / str(images)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = size_params(base, work, images, args.image_size, args.epochs)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("generate", "prepare"):
        run_stage(work, stage)
    manifest = pd.read_csv(work / "data/manifest.csv")
    counts = {f"{split}_images": int((manifest.split == split).sum()) for split in ("train", "val", "test")}
    row = {"images": images, **counts}
    per_image = {
        "features": len(manifest),
        "train": counts["train_images"] * args.epochs,
        "evaluate": counts["test_images"],
    }
    for stage in MEASURED:
        figures = run_stage(work, stage)
        row[stage] = {**figures, "ms_per_image": 1000 * figures["seconds"] / per_image[stage]}
        print(images, stage, row[stage], flush=True)
        if stage == "train":  # the bundle evaluate reads (not measured: a few seconds)
            for model_stage in ("calibrate", "package"):
                run_stage(work, model_stage)
    row["added_10_extracted"] = add_images(work, params, manifest, 10)
    print(images, "10 images added:", row["added_10_extracted"], "extracted", flush=True)
    shutil.rmtree(work / "data", ignore_errors=True)  # GBs of images and features
    return row


def add_images(work: Path, params: dict, manifest, count: int) -> int:
    """Add ``count`` new normal images (mirrored training images: new content) as a retrain would, re-run prepare
    and features, and return how many images the features stage extracted."""
    from PIL import Image

    added = work / "data/added"
    for _, row in manifest[manifest.split == "train"].head(count).iterrows():
        (added / row.category).mkdir(parents=True, exist_ok=True)
        mirrored = Image.open(row.path).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mirrored.save(added / row.category / f"mirrored_{Path(row.path).stem}.png")
    params["prepare"]["sources"].append({"kind": "normal_folder", "root": str(added)})
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage(work, "prepare")
    run_stage(work, "features")
    timing = json.loads(Path(params["outputs"]["timing"]).read_text())
    return int(timing["features"]["images_extracted"])


def table(rows: list[dict], args) -> str:
    lines = [
        f"Default model (params.yaml), {args.image_size} px, {args.epochs} training epochs. Time per image: features "
        "per manifest image, train per training image and epoch, evaluate per test image.",
        "",
        "| training pool | train / val / test | features ms/img | features RSS MiB | train ms/img | train RSS MiB "
        "| evaluate ms/img | evaluate RSS MiB | 10 images added: extracted |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[s][k]:.0f}" for s in MEASURED for k in ("ms_per_image", "peak_rss_mib")]
        cells.append(str(r["added_10_extracted"]))
        lines.append(
            f"| {r['images']} | {r['train_images']} / {r['val_images']} / {r['test_images']} | "
            + " | ".join(cells)
            + " |"
        )
    for stage in MEASURED:
        rss = [r[stage]["peak_rss_mib"] for r in rows]
        speed = [r[stage]["ms_per_image"] for r in rows]
        lines.append(
            f"\n{stage}: peak RSS max/min {max(rss) / min(rss):.2f}, time per image max/min {max(speed) / min(speed):.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 20000])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return stage_main(args.stage, args.work)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = [measure(base, images, args) for images in args.sizes]
    text = table(rows, args)
    print(text)
    write_results("scale", {"image_size": args.image_size, "epochs": args.epochs, "rows": rows}, text)


if __name__ == "__main__":
    main()
