"""The ONNX inference graph: every model exports, ONNX Runtime equals torch on real images, a disagreeing file is
refused, the export is byte-reproducible, and the CLI / predictor use it with one setting."""

import copy
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vqflow import onnx_graph
from vqflow.bundle import ModelBundle
from vqflow.data.images import load_image
from vqflow.inference import Predictor

# small enough to train in seconds; cflow and vitad are served on ONNX Runtime in test_serving_models.py
# case -> (model name, section overrides); the flow models take the project's vqflow section with the overrides
TINY_CASES = {
    "vqflow": ("vqflow", {}),
    "vqflow+global_gaussian": ("vqflow", {"global_gaussian": True}),
    "msflow": ("msflow", {}),
    "padim": ("padim", {"smoothing_sigma": 2.0}),
}


def _test_images(params) -> list:
    manifest = pd.read_csv(params["prepare"]["manifest"], dtype={"image_id": str}, keep_default_na=False)
    return [load_image(p) for p in manifest.loc[manifest.split == "test", "path"]]


def _close(onnx: np.ndarray, torch_: np.ndarray, tolerance: float) -> bool:
    return float(np.abs(onnx - torch_).max()) <= tolerance * max(1.0, float(np.abs(torch_).max()))


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_every_model_exports_and_onnx_runtime_equals_torch_on_the_test_images(case, trained_project, tmp_path):
    from vqflow import stages

    _, project = trained_project
    params = copy.deepcopy(project)  # the project's features, a model of its own
    name, overrides = TINY_CASES[case]
    if name in ("vqflow", "msflow"):  # msflow reads the vqflow section
        params["model"] = {**project["model"], "name": name, "vqflow": {**project["model"]["vqflow"], **overrides}}
    else:
        params["model"] = {"name": name, name: overrides}
    params["train"] = {**params["train"], "epochs": 1}
    params["package"] = {"onnx": True}
    params["outputs"] = {
        **params["outputs"],
        **{output: str(tmp_path / output) for output in ("weights", "model")},
        "thresholds": str(tmp_path / "thresholds.json"),
        "checkpoints": str(tmp_path / "ck"),
    }
    stages.run_all(params, stages.MODEL)
    assert ModelBundle(tmp_path / "model").onnx_path.is_file()

    images = _test_images(params)
    reference = Predictor(tmp_path / "model", "cpu").predict(images)
    onnx = Predictor(tmp_path / "model", "cpu", runtime="onnx", threads=1).predict(images)
    scores = np.array([r.score for r in reference]), np.array([r.score for r in onnx])
    assert _close(scores[1], scores[0], 1e-4), (case, np.abs(scores[1] - scores[0]).max())
    for ours, theirs in zip(onnx, reference):
        assert _close(ours.anomaly_map, theirs.anomaly_map, 1e-3), case
        assert ours.concept == theirs.concept
        assert ours.threshold == theirs.threshold
    assert np.argsort(scores[1]).tolist() == np.argsort(scores[0]).tolist()  # the same ranking of the test images


def test_a_graph_that_disagrees_with_torch_is_refused_and_nothing_is_written(trained_project, monkeypatch, tmp_path):
    import shutil

    _, params = trained_project
    bundle = ModelBundle(shutil.copytree(params["outputs"]["model"], tmp_path / "model"))
    bundle.onnx_path.unlink()
    monkeypatch.setitem(onnx_graph.TOLERANCE, "maps", -1.0)  # no difference is small enough
    with pytest.raises(onnx_graph.OnnxMismatchError, match="'maps' differs from torch"):
        bundle.add_onnx()
    assert sorted(p.name for p in bundle.path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "thresholds.json", "backbone.safetensors"]
    )  # no model.onnx, no temporary file left beside it


def test_a_changed_model_is_caught_by_the_check(trained_project):
    _, params = trained_project
    bundle = ModelBundle(params["outputs"]["model"])
    graph = onnx_graph.InferenceGraph(bundle.load_backbone(), bundle.load_model()).eval()
    scorer = onnx_graph.OnnxScorer(bundle.onnx_path, threads=1)
    images = onnx_graph.check_images(64)
    assert max(onnx_graph.verify(graph, scorer, images).values()) < 1e-3  # the model the file was made from
    with torch.no_grad():
        for p in graph.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(onnx_graph.OnnxMismatchError):
        onnx_graph.verify(graph, scorer, images)


def test_the_export_is_byte_reproducible(trained_project, tmp_path):
    _, params = trained_project
    bundle = ModelBundle(params["outputs"]["model"])
    again = onnx_graph.export_onnx(bundle.load_backbone(), bundle.load_model(), tmp_path / "again.onnx", 64)
    digest = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (bundle.onnx_path, again)]
    assert digest[0] == digest[1]  # a re-run of the train stage writes the same bundle (dvc.lock stays equal)


def test_cli_exports_and_predicts_on_onnx_runtime_and_names_a_missing_graph(
    trained_project, tmp_path, monkeypatch, capsys
):
    import shutil

    import yaml

    from vqflow.cli import main

    _, params = trained_project
    model = shutil.copytree(params["outputs"]["model"], tmp_path / "model")
    (model / "model.onnx").unlink()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    image = sorted(Path(params["generate"]["root"]).rglob("test/*/*.png"))[0]
    base = ["--params", str(tmp_path / "params.yaml")]
    predict = [*base, "predict", str(image), "--model", str(model), "--out", str(tmp_path / "overlays")]

    def run(argv, runtime="torch"):
        monkeypatch.setenv("VQFLOW_RUNTIME", runtime)
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = run(predict, "onnx")
    assert code == 2 and "model.onnx: no ONNX graph in this model bundle" in err
    code, out, err = run([*base, "export-onnx", "--model", str(model)])
    assert code == 0 and "ONNX Runtime agrees with torch" in out, err
    scores = []
    for runtime in ("onnx", "torch"):
        code, out, err = run(predict, runtime)
        assert code == 0, err
        scores.append(float(out.split("score=")[1].split()[0]))
    assert scores[0] == pytest.approx(scores[1], rel=1e-4, abs=1e-4)
    code, _, err = run(predict, "tensorrt")
    assert code == 2 and "VQFLOW_RUNTIME='tensorrt': expected one of ('torch', 'onnx')" in err
    code, _, err = run([*base, "export-onnx", "--model", str(tmp_path)])
    assert code == 2 and "not a trained vqflow model" in err


def test_static_same_padding_keeps_the_backbone_outputs_and_leaves_no_shape_arithmetic(trained_project):
    import onnx

    _, params = trained_project
    bundle = ModelBundle(params["outputs"]["model"])
    backbone = bundle.load_backbone()
    size = bundle.load_model().config.image_size
    static = copy.deepcopy(backbone)
    assert onnx_graph.static_same_padding(static, size) == 5  # Lite0's stem and four stride-2 depthwise convs
    images = onnx_graph.check_images(size)
    for before, after in zip(backbone(images), static(images)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)  # the same zeros, the same convolutions
    graph = onnx.load(str(bundle.onnx_path))
    backbone_ops = {node.op_type for node in graph.graph.node if node.name.startswith("/backbone/")}
    assert "Shape" not in backbone_ops and "Conv" in backbone_ops
