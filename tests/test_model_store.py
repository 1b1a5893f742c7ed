import copy

import pytest

from vqflow.model_store import compare

pytestmark = pytest.mark.slow  # git + DVC repositories reproduced end to end

METRICS = {
    "mean": {"image_auroc": 0.95, "pixel_auroc": 0.99, "mad": 0.80},
    "per_category": {"a": {"mad": 0.85}, "b": {"mad": 0.75}},
}


def test_first_model_becomes_champion():
    assert compare(METRICS, None, 0.005, 0.01).promote


def test_equal_or_better_within_tolerance_is_promoted():
    new = copy.deepcopy(METRICS)
    new["mean"]["image_auroc"] = 0.947  # -0.3 points, tolerance 0.5
    new["per_category"]["b"]["mad"] = 0.745  # -0.5 points, tolerance 1
    decision = compare(new, METRICS, 0.005, 0.01)
    assert decision.promote, decision.reasons


def test_a_worse_mean_metric_blocks_promotion_and_says_why():
    new = copy.deepcopy(METRICS)
    new["mean"]["pixel_auroc"] = 0.98
    decision = compare(new, METRICS, 0.005, 0.01)
    assert not decision.promote
    assert decision.reasons == ["mean pixel_auroc 98.00 < champion 99.00 - 0.50"]


def test_a_regressing_category_blocks_promotion_even_if_the_mean_improves():
    new = copy.deepcopy(METRICS)
    new["mean"]["mad"] = 0.85
    new["per_category"]["a"]["mad"] = 0.83
    new["per_category"]["b"]["mad"] = 0.90
    decision = compare(new, METRICS, 0.005, 0.01)
    assert not decision.promote and decision.reasons == ["a mAD 83.00 < champion 85.00 - 1.00"]
    del new["per_category"]["a"]
    assert "category a is missing" in compare(new, METRICS, 0.005, 0.01).reasons[0]


def _cli(project, env, *args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "vqflow.cli", "--params", str(project / "params.yaml"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture()
def project(trained_project, tmp_path):
    """A git repository on main holding params (champion record inside) and a copy of the trained model."""
    import json
    import os
    import shutil
    import subprocess

    import yaml

    _, params = trained_project
    shutil.copytree(params["outputs"]["model"], tmp_path / "model")
    shutil.copy(params["outputs"]["metrics"], tmp_path / "metrics.json")
    params = {
        **params,
        "outputs": {
            **params["outputs"],
            "model": str(tmp_path / "model"),
            "champions": "champions.json",
            "metrics": str(tmp_path / "metrics.json"),
            "export": str(tmp_path / "export.json"),
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "store"), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("DVC_EXP_NAME", None)
    for command in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "ci@example.com"],
        ["config", "user.name", "ci"],
        ["add", "params.yaml"],
        ["commit", "-q", "-m", "params"],
    ):
        subprocess.run(["git", *command], cwd=tmp_path, check=True, capture_output=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    return tmp_path, env, metrics


def _export(project, env, metrics, thresholds_shift=0.0):
    """Export the model (a different model when the thresholds are shifted) with these metrics."""
    import json

    path = project / "model/thresholds.json"
    thresholds = json.loads(path.read_text())
    thresholds["categories"]["__global__"]["image"] += thresholds_shift
    path.write_text(json.dumps(thresholds))
    (project / "metrics.json").write_text(json.dumps(metrics))
    run = _cli(project, env, "export")
    assert run.returncode == 0, run.stderr
    return json.loads((project / "export.json").read_text())


def test_committed_run_on_main_promotes_and_a_worse_model_stays_challenger(project):
    from vqflow.model_store import champion

    root, env, metrics = project
    first = _export(root, env, metrics)
    assert first["role"] == "champion" and first["tag"].startswith("vqflow-anomaly:")
    assert _export(root, env, metrics)["reasons"] == ["already the champion (same content tag)"]
    worse = copy.deepcopy(metrics)
    category = next(iter(worse["per_category"]))
    worse["per_category"][category]["mad"] -= 0.05
    second = _export(root, env, worse, thresholds_shift=1.0)
    assert second["role"] == "challenger" and second["champion_tag"] == first["tag"] and second["tag"] != first["tag"]
    assert any(category in reason for reason in second["reasons"])
    refused = _cli(root, env, "promote", second["tag"])
    assert refused.returncode != 0 and "is worse than the champion" in refused.stderr
    assert champion(root / "champions.json")["tag"] == first["tag"]


def test_experiments_branches_and_uncommitted_params_never_promote(project):
    import subprocess

    from vqflow.model_store import champion

    root, env, metrics = project
    in_experiment = _cli(root, {**env, "DVC_EXP_NAME": "curious-cats"}, "export")
    assert "as challenger" in in_experiment.stdout and "experiments never promote" in in_experiment.stdout
    subprocess.run(["git", "checkout", "-q", "-b", "try-cflow"], cwd=root, check=True)
    assert "only on 'main'" in _cli(root, env, "export").stdout
    subprocess.run(["git", "checkout", "-q", "main"], cwd=root, check=True)
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "# edited\n")
    assert "uncommitted changes" in _cli(root, env, "export").stdout
    assert champion(root / "champions.json") is None
    tag = _export(root, env, metrics)["tag"]  # still uncommitted: stored only
    promoted = _cli(root, env, "promote", tag)  # on purpose
    assert promoted.returncode == 0, promoted.stderr
    assert champion(root / "champions.json")["tag"] == tag


def test_an_unreachable_publish_target_is_a_transient_failure_that_promotes_nothing(project):
    import yaml

    from vqflow.testing import free_port

    root, env, metrics = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["export"]["publish"] = "s3://vqflow-models/champions/"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    import subprocess

    subprocess.run(["git", "commit", "-qam", "publish"], cwd=root, check=True)
    unreachable = {
        **env,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    run = _cli(root, unreachable, "export")
    assert run.returncode == 75, (run.returncode, run.stderr[-2000:])
    assert "transient error, retry" in run.stderr
    assert not (root / "champions.json").exists()  # not promoted: the retry will publish and promote


def _of_dataset(metrics, fingerprint, categories=None):
    """``metrics`` as if measured on another evaluation split (and other categories)."""
    other = copy.deepcopy(metrics)
    if categories:
        other["per_category"] = {c: next(iter(metrics["per_category"].values())) for c in categories}
    other["dataset"] = {"categories": sorted(other["per_category"]), "fingerprint": fingerprint}
    return other


def test_a_new_data_set_starts_its_own_champion_line_and_each_line_is_compared_within(project):
    from vqflow.model_store import line_champion, read_record

    root, env, metrics = project
    ours = _of_dataset(metrics, "a" * 64)
    first = _export(root, env, ours)
    assert first["role"] == "champion"
    theirs = _of_dataset(metrics, "b" * 64, ["bolt", "gear"])  # the user's own line: other parts, other images
    second = _export(root, env, theirs, thresholds_shift=1.0)
    assert second["role"] == "champion", second["reasons"]
    assert "first model of its data set" in second["reasons"][0] and first["tag"] in second["reasons"][0]
    record = read_record(root / "champions.json")
    assert [e["tag"] for e in record] == [first["tag"], second["tag"]]  # the service serves the latest
    assert record[-1]["metrics"]["dataset"]["fingerprint"] == "b" * 64
    # back on the first data set, a worse model is compared with that data set's champion, not the other line's
    worse = copy.deepcopy(ours)
    worse["per_category"][next(iter(worse["per_category"]))]["mad"] -= 0.05
    third = _export(root, env, worse, thresholds_shift=2.0)
    assert third["role"] == "challenger" and third["champion_tag"] == first["tag"]
    assert line_champion(read_record(root / "champions.json"), worse)["tag"] == first["tag"]
    started = _cli(root, env, "promote", third["tag"], "--new-line")  # a new line on purpose
    assert started.returncode == 0, started.stderr
    latest = read_record(root / "champions.json")[-1]
    assert latest["tag"] == third["tag"] and "new champion line started on purpose" in latest["reason"]


def test_a_record_from_before_data_sets_were_kept_is_matched_by_categories(project):
    from vqflow.model_store import same_dataset

    _, _, metrics = project
    legacy = {
        "tag": "vqflow-anomaly:old",
        "metrics": {"mean": metrics["mean"], "per_category": metrics["per_category"]},
    }
    assert same_dataset(legacy, _of_dataset(metrics, "c" * 64))
    assert not same_dataset(legacy, _of_dataset(metrics, "c" * 64, ["bolt"]))
