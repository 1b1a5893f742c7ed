"""Load test of `bentoml serve` on 127.0.0.1 only: latency p50/p95/p99 and throughput at several concurrencies,
against the library scoring the same images in batches of 16 (decode + model, no HTTP) measured in the same run.

Bounded: a fixed number of requests per level and a time limit; the server is started and stopped here.
Serves the champion (`make run` first) or ``--model-tag``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402
from vqflow.testing import bentoml_server  # noqa: E402


def _tree_rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def run_level(url: str, images: list[bytes], concurrency: int, requests_per_level: int, time_limit: float) -> dict:
    def one(i: int) -> tuple[float, bool]:
        started = time.perf_counter()
        try:
            r = requests.post(
                f"{url}/predict", files={"image": ("x.png", images[i % len(images)], "image/png")}, timeout=60
            )
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        return time.perf_counter() - started, ok

    latencies, errors = [], 0
    deadline = time.monotonic() + time_limit
    started = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        pending = {pool.submit(one, i) for i in range(min(concurrency, requests_per_level))}
        sent = len(pending)
        while pending:
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for f in done:
                seconds, ok = f.result()
                latencies.append(seconds)
                errors += not ok
                if sent < requests_per_level and time.monotonic() < deadline:
                    pending.add(pool.submit(one, sent))
                    sent += 1
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "throughput_rps": len(latencies) / wall,
    }


def library_rate(predictor, images: list[bytes], batch_size: int = 16, rounds: int = 8) -> float:
    """Images per second of Predictor.decode + Predictor.predict at ``batch_size`` (after a warm-up batch)."""
    batch = images[:batch_size]
    predictor.predict([predictor.decode(b) for b in batch])
    started = time.perf_counter()
    for _ in range(rounds):
        predictor.predict([predictor.decode(b) for b in batch])
    return rounds * len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,8,16,32")
    parser.add_argument("--model-tag", help="model of the BentoML store to serve (default: the champion)")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--images", default="data/synthetic", help="folder of 256x256 test images")
    parser.add_argument("--runtimes", default="torch,onnx", help="serve.runtime values to serve, one after the other")
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(Path(args.images).rglob("test/*/*.png"))[:64]]
    if not images:
        sys.exit(f"no test images under {args.images}: run `make run` first")
    from vqflow.serving import served_tag

    tag = args.model_tag or served_tag()

    runs = {runtime: serve_and_load(tag, runtime, images, args) for runtime in args.runtimes.split(",")}
    table = (
        "| runtime | concurrency | requests | errors | p50 ms | p95 ms | p99 ms | images/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    table += "\n".join(
        f"| {runtime} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
        f"{r['p99_ms']:.0f} | {r['throughput_rps']:.1f} |"
        for runtime, run in runs.items()
        for r in run["levels"]
    )
    for runtime, run in runs.items():
        at16 = next((r for r in run["levels"] if r["concurrency"] == 16), None)
        table += (
            f"\n\n{runtime}: the library (decode + model, batches of 16, no HTTP, serve.runtime {runtime}) in the same "
            f"run: {run['library_images_per_s']:.1f} images/s (mean of {run['library_before']:.1f} before and "
            f"{run['library_after']:.1f} after the server)"
            + (
                f"; the service at concurrency 16 reaches "
                f"{100 * at16['throughput_rps'] / run['library_images_per_s']:.0f} % of it"
                if at16
                else ""
            )
            + f". Server peak memory (RSS, all processes): {run['peak_rss_mib']:.0f} MiB."
        )
    table += f"\n\n256x256 PNG uploads to /predict, model {tag}; `serve.runtime` set by VQFLOW_RUNTIME."
    print(table)
    write_results("service_load", {"model_tag": tag, "runtimes": runs}, table)


def serve_and_load(tag: str, runtime: str, images: list[bytes], args) -> dict:
    """The library's batch-16 rate (before and after: the machine's speed drifts) and the served levels."""
    import bentoml

    from vqflow.inference import Predictor

    predictor = Predictor(bentoml.models.get(tag).path, "cpu", runtime=runtime)
    library_before = library_rate(predictor, images)
    print(f"{runtime}: library, batch 16: {library_before:.1f} images/s")
    with bentoml_server({"VQFLOW_MODEL_TAG": tag, "VQFLOW_RUNTIME": runtime}) as (url, server):
        proc = psutil.Process(server.pid)
        peak = _tree_rss(proc)
        rows = []
        for level in [int(x) for x in args.levels.split(",")]:
            with futures.ThreadPoolExecutor(1) as watcher:
                stop = [False]

                def watch():
                    nonlocal peak
                    while not stop[0]:
                        peak = max(peak, _tree_rss(proc))
                        time.sleep(0.2)

                w = watcher.submit(watch)
                rows.append(run_level(url, images, level, args.requests, args.time_limit))
                stop[0] = True
                w.result()
            print(runtime, rows[-1])
    library_after = library_rate(predictor, images)
    return {
        "levels": rows,
        "peak_rss_mib": peak / 2**20,
        "library_images_per_s": (library_before + library_after) / 2,
        "library_before": library_before,
        "library_after": library_after,
    }


if __name__ == "__main__":
    main()
