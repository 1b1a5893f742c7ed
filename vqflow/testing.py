"""What the test suite and the benchmarks share (the pipeline never imports it): the smallest params that run every
stage, slow and obviously correct reference implementations, and real servers on 127.0.0.1 (started as
subprocesses, waited for, always stopped). Needs the ``test`` extra (moto, scikit-image)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np


def tiny_params(root: Path) -> dict:
    """params for a complete tiny pipeline run inside ``root`` (64 px, small vqflow, 2 epochs)."""
    return {
        "generate": {
            "root": str(root / "data/synthetic"),
            "categories": ["wood", "chip"],
            "train_per_category": 8,
            "test_good_per_category": 2,
            "test_per_defect": 1,
            "size": 64,
            "seed": 0,
        },
        "prepare": {
            "sources": [{"kind": "mvtec", "root": str(root / "data/synthetic")}],
            "val_fraction": 0.25,
            "seed": 0,
            "manifest": str(root / "data/manifest.csv"),
        },
        "validate": {
            "min_train_per_category": 3,
            "min_test_per_category": 2,
            "result": str(root / "metrics/validation.json"),
            "docs": str(root / "reports/validation"),
        },
        "features": {
            "backbone": "tf_efficientnet_lite0",
            "weights": "packaged",
            "image_size": 64,
            "cache": str(root / "data/features"),
            "images_per_task": 8,
        },
        "model": {
            "name": "vqflow",
            "vqflow": {
                "embed_dim": 8,
                "pe_channels": 4,
                "num_prototypes": 2,
                "num_patterns": 8,
                "flow_blocks": [1, 1, 1],
            },
        },
        "train": {"epochs": 2, "batch_size": 4, "checkpoint_every": 1, "init_images": 8},
        "thresholds": {"target_frr": 0.01, "pixel_fpr": 0.005},
        "evaluate": {"batch_size": 4},
        "export": {"tolerance_mean": 0.005, "tolerance_category": 0.01},
        "outputs": {
            k: str(root / v)
            for k, v in {
                "weights": "models/weights",
                "thresholds": "models/thresholds.json",
                "model": "models/model",
                "checkpoints": "data/checkpoints",
                "train_log": "metrics/train_log.json",
                "metrics": "metrics/metrics.json",
                "scores": "metrics/scores.csv",
                "plots": "plots",
                "report": "reports/report.md",
                "export": "metrics/export.json",
                "timing": "metrics/timing.json",
            }.items()
        },
    }


def repo_params() -> dict:
    """tiny params for a git + DVC repository: relative paths and the project's data sources, over the project's
    params.yaml (DVC refuses a stage whose declared params keys are missing from params.yaml)."""
    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())

    def merged(base: dict, over: dict) -> dict:
        return {
            **base,
            **{
                k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                for k, v in over.items()
            },
        }

    params = merged(project, tiny_params(Path(".")))
    params["prepare"]["sources"] = project["prepare"]["sources"]
    return params


def slow_aupro(maps, masks, max_fpr=0.3):
    """Reference: loop over every distinct threshold, skimage labelling, region by region."""
    from skimage import measure

    masks = masks.astype(bool)
    regions = []
    for i, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)
        regions += [(i, labelled == r) for r in range(1, labelled.max() + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    fprs, pros = np.array(points).T
    area, prev_x, prev_y = 0.0, 0.0, 0.0
    for x, y in zip(fprs[1:], pros[1:]):
        if x > max_fpr:
            y_at = prev_y + (y - prev_y) * (max_fpr - prev_x) / (x - prev_x)
            area += (max_fpr - prev_x) * (prev_y + y_at) / 2
            return area / max_fpr
        area += (x - prev_x) * (prev_y + y) / 2
        prev_x, prev_y = x, y
    return area / max_fpr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status in ok:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s ({last})")


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3-compatible server (moto in server mode) on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", timeout=30)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "DVC_NO_ANALYTICS": "1",
    }


def s3_client(endpoint: str):
    """A boto3 S3 client of the test server at ``endpoint`` (moto accepts any credentials)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@contextlib.contextmanager
def bentoml_server(
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    target: str = "vqflow.serving:AnomalyService",
    cwd: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`bentoml serve <target>` (the service of this checkout, or a bento tag) on 127.0.0.1; yields (url, process)
    once /readyz is 200."""
    port = free_port()
    root = cwd or Path(__file__).resolve().parents[1]  # the checkout this package is in
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz", timeout=timeout)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def export_for_serving(root: Path, params: dict, env: dict[str, str]) -> tuple[str, str]:
    """`vqflow export` of a trained tiny project into ``env``'s BentoML home: (the model's tag, what export printed)."""
    import json
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    exported = subprocess.run(
        [sys.executable, "-m", "vqflow.cli", "--params", str(root / "params.yaml"), "export"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    if exported.returncode != 0:
        raise RuntimeError(f"vqflow export failed: {exported.stderr[-2000:]}")
    return json.loads(Path(params["outputs"]["export"]).read_text())["tag"], exported.stdout
