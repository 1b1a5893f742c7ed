"""`bentoml serve` as a real subprocess on 127.0.0.1: decisions, offline equality, bad input, still serving."""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from vqflow.testing import bentoml_server, export_for_serving

pytestmark = pytest.mark.slow  # a bentoml serve process per runtime


FEEDBACK_TOKEN = "s3cret-token"


def _tolerance(runtime: str, score: float) -> float:
    """torch serves the offline evaluation's numbers up to float32 noise (the backbone runs on the decoded upload
    with the server's threads, the evaluation on cached features; the per-position standardisation of the score
    divides that noise by each position's training std: 1.2e-6 relative measured); ONNX Runtime agrees with them
    to 1e-4 relative (vqflow/onnx_graph.py)."""
    return (1e-5 if runtime == "torch" else 1e-4) * max(1.0, abs(score))


@pytest.fixture(scope="module", params=["torch", "onnx"])
def server(request, trained_project, tmp_path_factory):
    """(url, root, params, inbox, runtime) of `bentoml serve` with ``serve.runtime`` = the param."""
    root, params = trained_project
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {
        **os.environ,
        "VQFLOW_RUNTIME": request.param,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "VQFLOW_MAX_PIXELS": "1000000",
        "VQFLOW_MAX_UPLOAD_BYTES": "2000000",
        "VQFLOW_MAX_BATCH_IMAGES": "8",
        "VQFLOW_INBOX": str(home / "line/inbox"),
        "VQFLOW_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
    }
    env["VQFLOW_MODEL_TAG"], printed = export_for_serving(root, params, env)
    assert "as challenger" in printed  # not a committed run on main: stored, not promoted
    with bentoml_server(env) as (url, _):
        yield url, root, params, Path(env["VQFLOW_INBOX"]), request.param


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _post(url, endpoint, data: bytes, name="x.png", content_type="image/png", **fields):
    return requests.post(f"{url}/{endpoint}", files={"image": (name, data, content_type)}, data=fields, timeout=60)


def test_served_scores_and_decisions_equal_the_offline_evaluation(server):
    url, root, params, _, runtime = server
    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    offline = pd.read_csv(params["outputs"]["scores"], dtype={"image_id": str}).set_index("image_id")
    thresholds = json.loads((Path(params["outputs"]["model"]) / "thresholds.json").read_text())
    test = manifest[manifest.split == "test"]
    for _, row in test.iterrows():
        response = _post(url, "predict", Path(row.path).read_bytes(), category=row.category)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = offline.loc[row.image_id, "score"]
        assert abs(body["score"] - expected) <= _tolerance(runtime, expected), (row.path, body["score"], expected)
        threshold = thresholds["categories"][row.category]["image"]
        assert body["threshold"] == pytest.approx(threshold)
        assert body["is_anomaly"] == (expected > threshold)
        assert body["concept"] == offline.loc[row.image_id, "concept"]
        assert body["model_tag"].startswith("vqflow-anomaly:") and body["latency_ms"] > 0
        assert body["threshold_source"] == "category"


def test_concurrent_requests_are_batched_and_answered_exactly(server):
    from concurrent.futures import ThreadPoolExecutor

    url, _, params, _, runtime = server
    paths = sorted(Path(params["generate"]["root"]).rglob("test/*/*.png"))[:12]
    alone = [_post(url, "predict", p.read_bytes()).json()["score"] for p in paths]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda p: _post(url, "predict", p.read_bytes()), paths))
    assert all(r.status_code == 200 for r in together)
    for response, score in zip(together, alone):
        assert abs(response.json()["score"] - score) <= _tolerance(runtime, score)
    assert all(r.json()["threshold_source"] == "global" for r in together)
    assert "bentoml_service_request_total" in requests.get(f"{url}/metrics", timeout=10).text


@pytest.mark.parametrize("server", ["torch"], indirect=True)  # runtime-independent: served on torch only
def test_batch_render_map_and_metrics(server):
    url, root, params, _, _ = server
    paths = sorted(Path(params["generate"]["root"]).rglob("test/*/*.png"))[:3]
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    batch = requests.post(f"{url}/predict_batch", files=files, timeout=60)
    assert batch.status_code == 200, batch.text
    assert len(batch.json()) == 3
    single = _post(url, "predict", paths[0].read_bytes(), with_map="true").json()
    assert abs(single["score"] - batch.json()[0]["score"]) < 1e-5
    import base64

    heat = Image.open(io.BytesIO(base64.b64decode(single["anomaly_map_png"])))
    assert heat.size == (64, 64)
    render = _post(url, "render", paths[0].read_bytes())
    assert render.status_code == 200 and render.headers["content-type"].startswith("image/png")
    assert Image.open(io.BytesIO(render.content)).size == (64, 64)


@pytest.mark.parametrize("server", ["torch"], indirect=True)  # runtime-independent: served on torch only
def test_other_image_modes_are_scored(server):
    url, _, params, _, _ = server
    path = sorted(Path(params["generate"]["root"]).rglob("train/good/*.png"))[0]
    rgb = Image.open(path)
    gray16 = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
    from vqflow.inference import Predictor

    predictor = Predictor(params["outputs"]["model"], device="cpu")
    for variant in (rgb.convert("L"), rgb.convert("RGBA"), gray16):
        data = _png(variant)
        response = _post(url, "predict", data)
        assert response.status_code == 200, (variant.mode, response.text)
        expected = predictor.predict([predictor.decode(data)])[0].score  # the library on the same bytes
        assert response.json()["score"] == pytest.approx(expected, abs=1e-5), variant.mode


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server):
    url, _, params, _, _ = server
    good = sorted(Path(params["generate"]["root"]).rglob("train/good/*.png"))[0].read_bytes()
    cases = {
        "not an image": (b"hello, this is text", "image/png", "cannot decode image"),
        "truncated": (good[: len(good) // 3], "image/png", "cannot decode image"),
        "empty": (b"", "image/png", "empty file"),
        "huge": (_png(Image.new("L", (1200, 1200))), "image/png", "exceeds the limit"),
        "wrong content type": (good, "text/plain", "content type"),
        "over the upload limit": (good + bytes(2_000_000), "image/png", "exceeds the upload limit"),
    }
    for name, (data, content_type, message) in cases.items():
        response = _post(url, "predict", data, name="part-17.png", content_type=content_type)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        body = response.json()
        assert set(body) == {"status", "error"} and body["status"] == response.status_code, (name, body)
        assert message.lower() in body["error"].lower(), (name, body)
        if name != "wrong content type":  # BentoML refuses that one before the service sees the file
            assert body["error"].startswith("part-17.png: "), (name, body)
        assert "/tmp" not in body["error"] and " object at 0x" not in body["error"], (name, body)
        assert _post(url, "predict", good).status_code == 200, f"server broken after {name}"
    assert _post(url, "predict", good + bytes(2_000_000)).status_code == 413
    unknown = _post(url, "predict", good, category="no-such-part")
    assert unknown.status_code == 400 and "known categories: ['chip', 'wood']" in unknown.json()["error"]
    missing = requests.post(f"{url}/predict", data={"category": "wood"}, timeout=60)
    assert missing.status_code == 400 and set(missing.json()) == {"status", "error"}
    too_many = requests.post(
        f"{url}/predict_batch", files=[("images", (f"{i}.png", good, "image/png")) for i in range(9)], timeout=60
    )
    assert too_many.status_code == 400 and "limit is 8" in too_many.json()["error"]
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200


def _stored(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("server", ["torch"], indirect=True)  # runtime-independent: served on torch only
def test_feedback_stores_confirmed_normals_once_and_defectives_apart(server):
    url, _, params, inbox, _ = server
    manifest = pd.read_csv(params["prepare"]["manifest"], keep_default_na=False)
    normal = manifest[(manifest.split == "test") & (manifest.label == 0)].iloc[0]
    defective = manifest[(manifest.split == "test") & (manifest.label == 1)].iloc[0]
    auth = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
    data = Path(normal.path).read_bytes()
    answers = [
        requests.post(
            f"{url}/feedback",
            files={"image": ("a.png", data, "image/png")},
            headers=auth,
            data={"category": normal.category, "label": "normal"},
            timeout=60,
        )
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    first, second = (a.json() for a in answers)
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    digest = hashlib.sha256(data).hexdigest()
    assert first["location"] == str(inbox / normal.category / f"{digest[:32]}.png") == second["location"]
    assert Path(first["location"]).read_bytes() == data
    sidecar = json.loads(Path(first["location"] + ".json").read_text())
    predicted = _post(url, "predict", data, category=normal.category).json()
    assert sidecar["score"] == pytest.approx(predicted["score"]) and sidecar["model_tag"] == predicted["model_tag"]
    assert (sidecar["category"], sidecar["label"], sidecar["sha256"], sidecar["source"]) == (
        normal.category,
        "normal",
        digest,
        "feedback",
    )
    assert sidecar["is_anomaly"] == predicted["is_anomaly"]

    marked = requests.post(
        f"{url}/feedback",
        files={"image": ("d.png", Path(defective.path).read_bytes(), "image/png")},
        headers=auth,
        data={"category": defective.category, "label": "defective"},
        timeout=60,
    )
    assert marked.status_code == 200, marked.text
    assert Path(marked.json()["location"]).parent.parent == inbox.parent / "review"  # never in the inbox
    assert _stored(inbox) == [f"{normal.category}/{digest[:32]}.png", f"{normal.category}/{digest[:32]}.png.json"]


@pytest.mark.parametrize("server", ["torch"], indirect=True)  # runtime-independent: served on torch only
def test_feedback_without_the_token_or_with_bad_input_writes_nothing(server):
    url, _, params, inbox, _ = server
    manifest = pd.read_csv(params["prepare"]["manifest"], keep_default_na=False)
    row = manifest[manifest.split == "test"].iloc[-1]
    before = _stored(inbox.parent)
    good = ("x.png", Path(row.path).read_bytes(), "image/png")
    cases = [
        ({}, good, {"category": row.category}, 401),
        ({"Authorization": "Bearer wrong"}, good, {"category": row.category}, 401),
        (
            {"Authorization": f"Bearer {FEEDBACK_TOKEN}"},
            ("notes.png", b"not an image", "image/png"),
            {"category": row.category},
            400,
        ),
        ({"Authorization": f"Bearer {FEEDBACK_TOKEN}"}, good, {"category": "no_such_category"}, 400),
        ({"Authorization": f"Bearer {FEEDBACK_TOKEN}"}, good, {"category": row.category, "label": "maybe"}, 400),
    ]
    for headers, upload, fields, status in cases:
        answer = requests.post(f"{url}/feedback", files={"image": upload}, data=fields, headers=headers, timeout=60)
        assert answer.status_code == status, (fields, answer.text)
        assert answer.json()["status"] == status and answer.json()["error"]
    assert (
        "notes.png"
        in requests.post(
            f"{url}/feedback", files={"image": cases[2][1]}, data=cases[2][2], headers=cases[2][0], timeout=60
        ).json()["error"]
    )
    assert _stored(inbox.parent) == before
