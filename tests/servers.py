"""Real servers on 127.0.0.1 for tests: started as subprocesses, waited for, always stopped."""

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
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", timeout=30)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_env(endpoint: str) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "DVC_NO_ANALYTICS": "1"}


@contextlib.contextmanager
def bentoml_server(env: dict[str, str] | None = None, timeout: float = 180.0, target: str = "vqflow.serving:AnomalyService",
                   cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`bentoml serve <target>` (the service of this checkout, or a bento tag) on 127.0.0.1; yields (url, process)
    once /readyz is 200."""
    port = free_port()
    root = cwd or Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", target,
                             "--host", "127.0.0.1", "--port", str(port)], cwd=root,
                            env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
