import copy

from vqflow.registry import compare

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


def test_export_to_a_real_store_keeps_the_champion_when_worse(trained_project, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import yaml

    root, params = trained_project
    params = {**params, "outputs": {**params["outputs"], "metrics": str(tmp_path / "metrics.json"),
                                    "export": str(tmp_path / "export.json")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "store"), "BENTOML_DO_NOT_TRACK": "true"}
    metrics = json.loads(open(trained_project[1]["outputs"]["metrics"]).read())

    def export(m):
        (tmp_path / "metrics.json").write_text(json.dumps(m))
        run = subprocess.run([sys.executable, "-m", "vqflow.cli", "--params", str(tmp_path / "params.yaml"), "export"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return json.loads((tmp_path / "export.json").read_text())

    first = export(metrics)
    assert first["role"] == "champion"
    worse = copy.deepcopy(metrics)
    category = next(iter(worse["per_category"]))
    worse["per_category"][category]["mad"] -= 0.05
    second = export(worse)
    assert second["role"] == "challenger" and second["champion_tag"] == first["tag"]
    assert any(category in reason for reason in second["reasons"])
    champion = subprocess.run([sys.executable, "-c", "from vqflow.registry import champion; print(champion().tag)"],
                              env=env, capture_output=True, text=True)
    assert champion.stdout.strip() == first["tag"]
