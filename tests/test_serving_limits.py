"""What a service on a line's network must refuse or bound, against `bentoml serve` on 127.0.0.1: a retrain inbox
without a feedback token, an opted-in open endpoint, a body over the upload limit (refused from its
Content-Length), and the memory 64 large images at once cost."""

import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from vqflow.testing import bentoml_server, export_for_serving, free_port

pytestmark = pytest.mark.slow  # bentoml serve processes under large uploads

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def service_env(trained_project, tmp_path_factory):
    """The environment of a service of the trained tiny model (exported into a BentoML home of its own)."""
    root, params = trained_project
    home = tmp_path_factory.mktemp("limits_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "VQFLOW_RUNTIME": "torch"}
    env.pop("VQFLOW_FEEDBACK_TOKEN", None)
    env["VQFLOW_MODEL_TAG"], _ = export_for_serving(root, params, env)
    return env, home, params


def test_an_inbox_without_a_feedback_token_refuses_to_start(service_env):
    env, home, _ = service_env
    port = free_port()
    server = subprocess.run(
        [str(BIN / "bentoml"), "serve", "vqflow.serving:AnomalyService", "--host", "127.0.0.1", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[1],
        env={**env, "VQFLOW_INBOX": str(home / "inbox")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert server.returncode != 0
    assert "VQFLOW_FEEDBACK_TOKEN" in server.stderr and "VQFLOW_FEEDBACK_UNAUTHENTICATED" in server.stderr
    assert not (home / "inbox").exists()


def _large_jpeg(seed: int, size=(4000, 3000)) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    texture = rng.normal(0, 20, (h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
    pixels = np.linspace(0, 200, w, dtype=np.float32)[None, :, None] + texture
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _peak_rss(process: psutil.Process) -> int:
    """The largest peak resident set (VmHWM) among the server's processes, in bytes."""
    peaks = []
    for proc in [process, *process.children(recursive=True)]:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


@pytest.fixture(scope="module")
def open_service(service_env):
    env, home, params = service_env
    settings = {
        **env,
        "VQFLOW_INBOX": str(home / "open/inbox"),
        "VQFLOW_FEEDBACK_UNAUTHENTICATED": "true",
        "VQFLOW_MAX_PIXELS": "20000000",
        "VQFLOW_MAX_UPLOAD_BYTES": "4000000",
    }
    with bentoml_server(settings) as (url, process):
        yield url, process, home / "open/inbox", params


def test_an_opted_in_open_feedback_endpoint_takes_feedback_without_a_token(open_service):
    import pandas as pd

    url, _, inbox, params = open_service
    manifest = pd.read_csv(params["prepare"]["manifest"], keep_default_na=False)
    row = manifest[(manifest.split == "test") & (manifest.label == 0)].iloc[0]
    answer = requests.post(
        f"{url}/feedback",
        files={"image": ("a.png", Path(row.path).read_bytes(), "image/png")},
        data={"category": row.category},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert Path(answer.json()["location"]).is_file() and Path(answer.json()["location"]).parent.parent == inbox


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_read(open_service):
    url, _, _, _ = open_service
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(  # the headers announce 1 GB and no byte of it follows: only the header can be judged
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        started, answer = time.perf_counter(), b""
        while chunk := connection.recv(4096):  # the server answers and closes
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "1000000000 bytes declared" in answer and time.perf_counter() - started < 5
    chunked = requests.post(  # no Content-Length (a generator is sent chunked): cut off once past the limit
        f"{url}/predict", data=(b"x" * 65536 for _ in range(200)), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert chunked.status_code == 413 and "the limit" in chunked.json()["error"]
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200


def test_64_large_images_at_once_cost_bounded_memory(open_service):
    url, process, _, _ = open_service
    server = psutil.Process(process.pid)
    uploads = [_large_jpeg(seed) for seed in range(4)]  # 12 MP each: 36 MB decoded, ~1.3 MB as JPEG
    before = _peak_rss(server)

    def send(i: int):
        return requests.post(
            f"{url}/predict", files={"image": (f"{i}.jpg", uploads[i % 4], "image/jpeg")}, timeout=300
        ).status_code

    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(send, range(64)))
    assert statuses == [200] * 64
    growth = _peak_rss(server) - before
    # held at full resolution until their batch, the 64 decoded images alone are 2.3 GB; reduced to the working size
    # as they are decoded, only the few being decoded at once are large
    assert growth < 1_000_000_000, f"peak RSS grew {growth / 1e6:.0f} MB"
    print(f"peak RSS growth for 64 concurrent 12 MP uploads: {growth / 1e6:.0f} MB")
