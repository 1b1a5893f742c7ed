"""The gate's near-copy check (validate.near_copy_distance) on the default data, MVTec bottle and Magnetic Tile:
false positives among the distinct images, the distance of planted copies, and its time against prepare's.

    python -m bench.near_copies [--shared ../shared]

Writes bench/results/near_copies.{json,md} (the README block ``near-copies``) and bench/.work/near_copies_pairs.png,
every flagged pair side by side so that a person can see whether it is a real near-copy (git-ignored: it shows images
of ../shared, which are never committed).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from bench.common import publish
from vqflow.config import load_params
from vqflow.data.sources import read_sources
from vqflow.data.images import load_image
from vqflow.data.manifest import STATS_SIZE, build_manifest, perceptual_hashes
from vqflow.data.synthetic import generate
from vqflow.validation.checks import HASH_BITS, _hash_words, _nearest, near_copies

ROOT = Path(__file__).resolve().parents[1]
PLANTED = 20  # training images per data set copied with each transform


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


COPIES = {
    "mirrored": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "turned 90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "JPEG q70": lambda im: _jpeg(im, 70),
    "resized 90 %": lambda im: im.resize((int(im.width * 0.9), int(im.height * 0.9)), Image.BICUBIC),
    "resized 110 %": lambda im: im.resize((int(im.width * 1.1), int(im.height * 1.1)), Image.BICUBIC),
    "darker 15 %": lambda im: ImageEnhance.Brightness(im).enhance(0.85),
    "brighter 15 %": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "flipped + JPEG + brighter 10 %": lambda im: ImageEnhance.Brightness(
        _jpeg(im, 80).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    ).enhance(1.1),
}


def suites(shared: Path, work: Path) -> dict[str, list[dict]]:
    params = load_params(ROOT / "params.yaml")["generate"]
    default = generate(
        work / "synthetic",
        params["categories"],
        params["train_per_category"],
        params["test_good_per_category"],
        params["test_per_defect"],
        params["size"],
        params["seed"],
        progress=False,
    )
    return {
        "default (synthetic)": [{"kind": "mvtec", "root": str(default)}],
        "MVTec bottle": [{"kind": "mvtec", "root": str(shared / "data/mvtec_ad"), "categories": ["bottle"]}],
        "Magnetic Tile": [{"kind": "magnetic_tile", "root": str(shared / "data/magnetic_tile")}],
    }


def planted_distances(frame: pd.DataFrame) -> dict[str, int]:
    """The largest distance of a planted copy (each transform of PLANTED training images) to its original."""
    picks = frame[frame.split != "test"].sample(min(PLANTED, int((frame.split != "test").sum())), random_state=0)
    worst: dict[str, int] = {}
    for _, row in picks.iterrows():
        original = _hash_words(pd.Series([row.phash]))
        image = load_image(row.path)
        for name, transform in COPIES.items():
            copy = transform(image).convert("L").resize((STATS_SIZE, STATS_SIZE), Image.BILINEAR)
            distance, _ = _nearest(_hash_words(pd.Series([perceptual_hashes(copy)]))[:, 0], original)
            worst[name] = max(worst.get(name, 0), int(distance[0, 0]))
    return worst


def pairs_sheet(flagged: list[tuple[str, str]], path: Path, thumb: int = 160) -> None:
    """The flagged pairs side by side (at most 12 rows)."""
    rows = flagged[:12] or [("", "")]
    sheet = Image.new("RGB", (2 * thumb + 10, len(rows) * (thumb + 10)), "white")
    for r, pair in enumerate(rows):
        for c, image_path in enumerate(pair):
            if image_path:
                sheet.paste(load_image(image_path).resize((thumb, thumb)), (c * (thumb + 10), r * (thumb + 10)))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="folder holding data/")
    args = parser.parse_args()
    limit = int(load_params(ROOT / "params.yaml")["validate"]["near_copy_distance"])
    rows, payload, flagged_pairs = [], {"near_copy_distance": limit, "hash_bits": HASH_BITS, "suites": {}}, []
    with tempfile.TemporaryDirectory() as work:
        for name, sources in suites(Path(args.shared), Path(work)).items():
            started = time.perf_counter()
            frame = build_manifest(read_sources(sources), 0.1, 0, progress=False)
            prepare_seconds = time.perf_counter() - started
            started = time.perf_counter()
            across, within = near_copies(frame, limit)
            check_seconds = time.perf_counter() - started
            nearest = []
            for _, group in frame.groupby("category"):
                words = _hash_words(group.phash)
                distance, _ = _nearest(words[:, 0], words)
                np.fill_diagonal(distance, HASH_BITS)
                nearest.append(distance.min(axis=1))
            nearest = np.concatenate(nearest)
            planted = planted_distances(frame)
            flagged = {**within, **across}
            for index, note in sorted(flagged.items()):
                partner = note.split("near-copy of ", 1)[1].split(" (", 1)[0]
                if (partner, frame.path[index]) not in flagged_pairs:
                    flagged_pairs.append((frame.path[index], partner))
            payload["suites"][name] = {
                "images": len(frame),
                "flagged_across_splits": sorted(frame.path[i] for i in across),
                "flagged_in_split": sorted(frame.path[i] for i in within),
                "nearest_distinct_min": int(nearest.min()),
                "nearest_distinct_p1": float(np.percentile(nearest, 1)),
                "nearest_distinct_median": float(np.median(nearest)),
                "planted_worst": planted,
                "prepare_seconds": prepare_seconds,
                "check_seconds": check_seconds,
            }
            caught = sum(d <= limit for d in planted.values())
            rows.append(
                f"| {name} | {len(frame)} | {len(across)} | {len(within)} | {int(nearest.min())} / "
                f"{np.median(nearest):.0f} | {caught} of {len(planted)} | "
                + ", ".join(f"{k} {v}" for k, v in planted.items())
                + f" | {check_seconds:.2f} s of {prepare_seconds:.1f} s ({100 * check_seconds / prepare_seconds:.1f} %) |"
            )
        (ROOT / "bench/.work").mkdir(parents=True, exist_ok=True)
        pairs_sheet(flagged_pairs, ROOT / "bench/.work/near_copies_pairs.png")
    table = "\n".join(
        [
            f"Near-copy check: 256-bit perceptual hash (imagehash.phash, 16 x 16 DCT) under the 8 flips and quarter "
            f"turns, flagged at <= {limit} differing bits (validate.near_copy_distance).",
            "",
            "| data | images | flagged across splits | flagged in a split (warning) | nearest distinct image, "
            "min / median bits | planted copy kinds caught | worst distance of each planted kind (bits) | "
            "check time of prepare time |",
            "|---|---:|---:|---:|---:|---|---|---:|",
            *rows,
            "",
            "Flagged pairs, side by side: `bench/.work/near_copies_pairs.png` (written by the script, not committed: "
            "it shows the data sets' images).",
        ]
    )
    print(publish("near_copies", payload, table, "near-copies"))


if __name__ == "__main__":
    main()
