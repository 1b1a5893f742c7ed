"""AUPRO speed: the vectorised implementation against the slow per-threshold reference, on the same maps."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_results  # noqa: E402
from vqflow.testing import slow_aupro  # noqa: E402
from vqflow.metrics import aupro  # noqa: E402


def synthetic_maps(count: int, size: int, levels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random maps with elliptical defect regions of varied sizes in half of the images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((count, size, size), bool)
    for i in range(0, count, 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = rng.integers(0, size, 2).tolist() + rng.integers(1, size // 6, 2).tolist()
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = ndimage.gaussian_filter(rng.random((count, size, size)), (0, 2, 2)) + 0.04 * masks
    maps = np.round((maps - maps.min()) / (maps.max() - maps.min()) * (levels - 1)) / (levels - 1)
    return maps.astype(np.float32), masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--maps", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--levels", type=int, default=1000, help="distinct map values (thresholds of the reference)")
    args = parser.parse_args()
    maps, masks = synthetic_maps(args.maps, args.size, args.levels)
    started = time.perf_counter()
    fast = aupro(maps, masks)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = slow_aupro(maps, masks)
    slow_s = time.perf_counter() - started
    payload = {
        "maps": args.maps,
        "size": args.size,
        "levels": args.levels,
        "aupro_fast": fast,
        "aupro_reference": slow,
        "fast_seconds": fast_s,
        "reference_seconds": slow_s,
        "speedup": slow_s / fast_s,
    }
    table = (
        f"| {args.maps} maps of {args.size}x{args.size}, {args.levels} levels | seconds | AUPRO |\n|---|---:|---:|\n"
        f"| vectorised (vqflow.metrics.aupro) | {fast_s:.2f} | {fast:.6f} |\n"
        f"| per-threshold reference | {slow_s:.2f} | {slow:.6f} |\n"
        f"| speed-up | {slow_s / fast_s:.0f}x | diff {abs(fast - slow):.2e} |"
    )
    print(table)
    write_results("aupro", payload, table)


if __name__ == "__main__":
    main()
