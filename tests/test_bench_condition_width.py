"""bench/condition_width.py: a width differs from the ablation's VQ-Flow row only in embed_dim and where its run is
written, and replaces ours only past the margin of bench/score_rules.py."""

from pathlib import Path

import yaml

from bench.ablation import ablation_base, variant_params
from bench.condition_width import VQFLOW_ROW, clears_margin, width_params
from bench.score_rules import MARGIN
from tests.conftest import ROOT


def test_a_width_changes_only_embed_dim_and_the_run_directory() -> None:
    base, work = ablation_base("default", "../shared")
    row = variant_params(base, work, VQFLOW_ROW)
    wide = width_params(base, work, 64)
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["vqflow"]["embed_dim"] != 64
    assert wide["model"]["vqflow"] == {**row["model"]["vqflow"], "embed_dim": 64}
    assert {k: v for k, v in wide.items() if k not in ("model", "outputs")} == {
        k: v for k, v in row.items() if k not in ("model", "outputs")
    }
    changed = {key for key in row["outputs"] if wide["outputs"][key] != row["outputs"][key]}
    assert {"model", "train_log", "metrics", "scores", "timing"} <= changed
    assert all(Path(wide["outputs"][key]).is_relative_to(work / "width_64") for key in changed)
    assert wide["outputs"]["checkpoints"] == row["outputs"]["checkpoints"]  # keyed by params and code, shared


def test_a_width_replaces_ours_only_past_the_margin_without_losing_past_it() -> None:
    step = MARGIN / 5
    assert clears_margin(MARGIN + step, 0.0)
    assert clears_margin(-MARGIN, MARGIN + step)
    assert not clears_margin(MARGIN, MARGIN)  # a gain of exactly the margin is not past it
    assert not clears_margin(MARGIN + step, -MARGIN - step)
    assert not clears_margin(0.0, 0.0)
