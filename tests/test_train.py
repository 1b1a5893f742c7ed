import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_baselines import TINY_BY_MODEL
from tests.test_vqflow_model import tiny_features
from vqflow.models import create_model, make_config
import vqflow
from vqflow.train import (
    Checkpoint,
    TrainConfig,
    cpu_has_bfloat16,
    learning_rate,
    seed_everything,
    train_model,
)

CFG = TrainConfig(epochs=4, batch_size=4, lr=1e-3, warmup_epochs=1, checkpoint_every=1, init_images=8, seed=5)


def _fresh(name="vqflow"):
    seed_everything(CFG.seed)
    return create_model(name, make_config(name, TINY_BY_MODEL[name]))


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_epochs=2, lr_decay_epochs=[5], lr_decay=0.1)
    assert learning_rate(cfg, 0, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 1, 0, 10) == pytest.approx(0.55)
    assert learning_rate(cfg, 3, 0, 10) == 1.0 and learning_rate(cfg, 5, 0, 10) == pytest.approx(0.1)


def test_cosine_schedule_warms_up_then_follows_a_half_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, epochs=12, warmup_epochs=2, lr_decay=0.1, schedule="cosine")
    assert learning_rate(cfg, 1, 0, 10) == pytest.approx(0.55)  # the warm-up of the step schedule
    rates = [learning_rate(cfg, epoch, step, 10) for epoch in range(2, 12) for step in range(10)]
    assert rates[0] == pytest.approx(1.0) and all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[50] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: half-way between lr and the floor
    assert learning_rate(cfg, 12, 0, 10) == pytest.approx(0.1)  # the end of the last epoch
    with pytest.raises(ValueError, match="train.schedule"):
        TrainConfig(schedule="linear")


def test_training_lowers_the_loss_and_logs_usage():
    history = train_model(_fresh(), tiny_features(12), CFG, torch.device("cpu"), progress=False)
    assert len(history) == 4 and history[-1]["flow"] < history[0]["flow"]
    for key in ("loss", "flow", "cpc", "cspc", "cpc_perplexity", "cpc_used", "cspc0_perplexity", "cspc2_used", "lr"):
        assert key in history[0]
    assert 0 < history[-1]["cpc_used"] <= 1 and history[-1]["cspc0_perplexity"] >= 1


BF16_KERNELS = cpu_has_bfloat16()


@pytest.mark.skipif(not BF16_KERNELS, reason="no bfloat16 CPU kernels here: train.precision: bfloat16 is refused")
@pytest.mark.parametrize("name", ["vqflow", "msflow"])
def test_bfloat16_training_follows_float32(name):
    features = tiny_features(12)
    exact = train_model(_fresh(name), features, CFG, torch.device("cpu"), progress=False)
    model = _fresh(name)
    fast = train_model(
        model, features, dataclasses.replace(CFG, precision="bfloat16"), torch.device("cpu"), progress=False
    )
    exact_nll, fast_nll = [row["flow"] for row in exact], [row["flow"] for row in fast]
    assert fast_nll != exact_nll, "the steps did not run in bfloat16"
    np.testing.assert_allclose(fast_nll, exact_nll, rtol=0.003)  # measured 5e-4; 4 epochs move it 1.5 %
    assert fast_nll[-1] < fast_nll[0]
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())


def test_loss_curves_plot_every_trained_run_from_its_log(tmp_path):
    import xml.etree.ElementTree as ElementTree

    from vqflow.plots import loss_curves

    history = train_model(_fresh(), tiny_features(12), CFG, torch.device("cpu"), progress=False)
    fitted_only = [{"epoch": 0, "seconds": 0.1}]  # a statistics-only model has no curve
    path = loss_curves({"vqflow-run": history, "padim-run": fitted_only}, tmp_path / "loss.svg")
    text = path.read_text()
    ElementTree.fromstring(text)  # a well-formed SVG
    assert "vqflow-run" in text and "padim-run" not in text


@pytest.mark.parametrize(
    "name, precision",
    [(name, "float32") for name in ("vqflow", "msflow", "cflow", "vitad")]  # every model trained by gradient
    + [pytest.param("vqflow", "bfloat16", marks=pytest.mark.skipif(not BF16_KERNELS, reason="no bfloat16 kernels"))],
)
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, name, precision):
    features = tiny_features(12)
    cfg = dataclasses.replace(CFG, precision=precision)
    whole = _fresh(name)
    full_history = train_model(
        whole, features, cfg, torch.device("cpu"), Checkpoint(tmp_path / "a", "k"), progress=False
    )

    interrupted = _fresh(name)
    partial = train_model(
        interrupted,
        features,
        cfg,
        torch.device("cpu"),
        Checkpoint(tmp_path / "b", "k"),
        progress=False,
        stop_after_epoch=2,
    )
    assert len(partial) == 2
    resumed = _fresh(name)  # a new process would start from scratch and find the checkpoint
    history = train_model(resumed, features, cfg, torch.device("cpu"), Checkpoint(tmp_path / "b", "k"), progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == [h["loss"] for h in full_history]
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    progress = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert progress["epoch"] == 3


def test_a_checkpoint_is_resumed_only_by_the_training_code_that_wrote_it(tmp_path):
    """The fingerprint digests the train stage's code (vqflow.code): an edit there starts afresh, an edit of code
    the stage does not run (thresholds, bundle) resumes."""
    from vqflow.code import digest, stage_files

    library = Path(vqflow.__file__).parent
    shutil.copytree(library, tmp_path / "vqflow", ignore=shutil.ignore_patterns("__pycache__"))
    fingerprint = lambda: digest(stage_files("train", tmp_path), tmp_path)  # noqa: E731
    before = fingerprint()
    assert before == digest(stage_files("train"))
    for untrained in ("thresholds.py", "bundle.py", "stages/evaluate.py"):
        (tmp_path / "vqflow" / untrained).write_text((tmp_path / "vqflow" / untrained).read_text() + "# edit\n")
    assert fingerprint() == before
    flows = tmp_path / "vqflow" / "models" / "flows.py"
    flows.write_text(flows.read_text().replace("clamp", "clamp ", 1))  # an edit of code the training runs
    assert fingerprint() != before


def test_checkpoint_of_another_configuration_is_ignored(tmp_path):
    features = tiny_features(12)
    train_model(
        _fresh(),
        features,
        CFG,
        torch.device("cpu"),
        Checkpoint(tmp_path / "c", "old"),
        progress=False,
        stop_after_epoch=2,
    )
    history = train_model(
        _fresh(), features, CFG, torch.device("cpu"), Checkpoint(tmp_path / "c", "new"), progress=False
    )
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_divergence_is_reported():
    model = _fresh()
    features = [f * np.float32(1e30) for f in tiny_features(12)]
    with pytest.raises(FloatingPointError, match="loss is"):
        train_model(model, features, CFG, torch.device("cpu"), progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_from_the_cache_equals_training_in_memory(tmp_path, workers):
    from tests.test_features import write_cache
    from vqflow.features import CachedFeatures

    features = tiny_features(12)
    in_memory = _fresh()
    expected = train_model(in_memory, features, CFG, torch.device("cpu"), progress=False)
    cache, ids = write_cache(tmp_path, features)
    streamed = _fresh()
    history = train_model(
        streamed, CachedFeatures(cache, ids), CFG, torch.device("cpu"), progress=False, workers=workers
    )
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in expected]
    for (name, a), b in zip(in_memory.state_dict().items(), streamed.state_dict().values()):
        assert torch.equal(a, b), name
