"""The feedback store on a local folder and on a real S3-compatible server (moto on 127.0.0.1), the retrain
inbox's staging of a remote store, and `vqflow feedback`."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from flows import inbox as inbox_store
from vqflow.feedback import FeedbackError, FeedbackStore, read_sidecar
from vqflow.testing import moto_s3, s3_env


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3() as endpoint:
        env = s3_env(endpoint)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # s3fs (fsspec) and boto3 read the endpoint and keys from the environment
        boto3.client("s3").create_bucket(Bucket="line")
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _objects(prefix: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket="line", Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_same_image_is_stored_once_with_its_record_and_defectives_apart(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3")
        inbox = f"s3://line/{tmp_path.name}/inbox"
    else:
        inbox = str(tmp_path / "inbox")
    store = FeedbackStore(inbox)
    data = _png(1)
    first = store.put(data, "PNG", "wood", "normal", score=0.9, is_anomaly=True, threshold=0.5, model_tag="m:1")
    again = store.put(data, "PNG", "wood", "normal", score=0.9, is_anomaly=True, threshold=0.5, model_tag="m:1")
    digest = hashlib.sha256(data).hexdigest()
    assert first.location == again.location == f"{inbox}/wood/{digest[:32]}.png"
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.sidecar == first.sidecar  # the first record stands
    sidecar = read_sidecar(first.location)
    assert sidecar["sha256"] == digest and sidecar["score"] == 0.9 and sidecar["source"] == "feedback"
    flagged = store.put(_png(2), "PNG", "wood", "defective", score=2.0)
    assert flagged.location.startswith(inbox.rsplit("/", 1)[0] + "/review/wood/")
    for bad, field in [
        (("PNG", "wood", "maybe"), "label"),
        (("PNG", "../etc", "normal"), "category"),
        (("GIF", "wood", "normal"), "image"),
    ]:
        with pytest.raises(FeedbackError, match=field):
            store.put(_png(3), *bad)
    if where == "s3":
        stored = _objects(f"{tmp_path.name}/")
        base = f"{tmp_path.name}/inbox/wood/{digest[:32]}.png"
        assert [k for k in stored if "/inbox/" in k] == [base, base + ".json"]
        assert boto3.client("s3").get_object(Bucket="line", Key=base)["Body"].read() == data
    else:
        files = sorted(p.name for p in (tmp_path / "inbox/wood").iterdir())
        assert files == [f"{digest[:32]}.png", f"{digest[:32]}.png.json"]  # no temporary file left behind
    assert store.put(_png(3), "PNG", "wood", "normal").duplicate is False


def test_a_remote_inbox_is_staged_capped_oldest_first_and_emptied_only_when_asked(s3, tmp_path):
    inbox = "s3://line/staging/inbox"
    store = FeedbackStore(inbox)
    sent = [
        store.put(
            _png(10 + i), "PNG", "wood", "normal", score=1.0, is_anomaly=True, received_at=f"2026-11-0{3 - i}T08:00:00Z"
        )
        for i in range(3)
    ]  # sent[0] is the newest
    boto3.client("s3").put_object(Bucket="line", Key="staging/inbox/chip/by_hand.png", Body=_png(20))
    folder = inbox_store.fetch(tmp_path, inbox)
    assert folder == tmp_path / inbox_store.STAGING
    staged = inbox_store.waiting(tmp_path, inbox)
    assert sorted(p.name for p in staged) == sorted([Path(s.location).name for s in sent] + ["by_hand.png"])
    for s in sent:  # the bytes, and the sidecar beside each image
        local = folder / "wood" / Path(s.location).name
        assert hashlib.sha256(local.read_bytes()).hexdigest() == s.sha256 and read_sidecar(str(local))

    taken, left = inbox_store.capped([str(p) for p in staged], per_category=2)
    assert [Path(p).name for p in left] == [Path(sent[0].location).name]  # the newest waits for the next run
    assert sum(Path(p).parent.name == "wood" for p in taken) == 2 and any("by_hand" in p for p in taken)
    assert len(inbox_store.from_feedback(taken)) == 2  # the hand-copied image has no feedback record

    for path in taken:
        inbox_store.remove(tmp_path, inbox, Path(path))
    remaining = _objects("staging/inbox/")
    assert remaining == sorted(
        [f"staging/inbox/wood/{Path(left[0]).name}", f"staging/inbox/wood/{Path(left[0]).name}.json"]
    )
    assert [p.name for p in inbox_store.waiting(tmp_path, inbox)] == [Path(left[0]).name]
    inbox_store.fetch(tmp_path, inbox)  # a new run mirrors the store again: what was removed stays removed
    assert [p.name for p in inbox_store.waiting(tmp_path, inbox)] == [Path(left[0]).name]


def test_feedback_cli_stores_scored_images_and_stops_before_writing_on_a_bad_file(trained_project, tmp_path):
    root, params = trained_project
    import pandas as pd
    import yaml

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    manifest = pd.read_csv(params["prepare"]["manifest"], keep_default_na=False)
    normals = manifest[(manifest.split == "test") & (manifest.label == 0)].path.tolist()[:2]
    inbox = tmp_path / "inbox"
    command = [
        sys.executable,
        "-m",
        "vqflow.cli",
        "--params",
        str(params_file),
        "feedback",
        "--inbox",
        str(inbox),
        "--category",
        manifest[manifest.path == normals[0]].category.iloc[0],
    ]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    refused = subprocess.run([*command, normals[0], str(bad)], capture_output=True, text=True, cwd=root)
    assert refused.returncode == 2 and "bad.png" in refused.stderr
    assert not inbox.exists()
    done = subprocess.run([*command, normals[0], normals[0]], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "already stored" in done.stdout.splitlines()[1]
    images = [p for p in inbox.rglob("*.png")]
    assert len(images) == 1 and images[0].read_bytes() == Path(normals[0]).read_bytes()
    sidecar = json.loads(Path(str(images[0]) + ".json").read_text())
    assert sidecar["model_tag"].startswith("vqflow-anomaly:") and isinstance(sidecar["score"], float)


def test_a_store_follows_the_endpoint_of_the_environment_it_is_used_in(s3, tmp_path):
    """A service or flow whose S3 endpoint changes (a test server per test, rotated credentials) must not write
    through a filesystem fsspec cached for the previous endpoint."""
    FeedbackStore("s3://line/first").put(_png(30), "PNG", "wood", "normal")
    with moto_s3() as second:
        saved = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = second
        try:
            boto3.client("s3").create_bucket(Bucket="line")
            stored = FeedbackStore("s3://line/second").put(_png(31), "PNG", "wood", "normal")
            on_second = _objects("second/")
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
    key = stored.location.removeprefix("s3://line/")
    assert on_second == [key, key + ".json"]
    assert _objects("second/") == []  # nothing went to the first server
