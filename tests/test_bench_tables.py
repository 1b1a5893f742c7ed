"""The bench scripts' shared table code (bench/common.py) rebuilds the committed per-category tables from the JSON
results they were written with: a change to it that would alter a committed table fails here."""

from __future__ import annotations

import json

import pytest

from bench.common import per_category_table
from tests.conftest import ROOT

RESULTS = ROOT / "bench/results"


def rows_of(stem: str) -> tuple[str, str, dict[str, dict[str, float]]]:
    """(title, row column, rows) of a committed results file's per-category table, from its JSON."""
    payload = json.loads((RESULTS / f"{stem}.json").read_text())
    if stem.startswith("experiments_"):
        return "Image AUROC per category", "model", {r["model"]: r["per_category"] for r in payload["experiments"]}
    if stem.startswith("ablation_"):
        return "Image AUROC per category", "variant", {n: r["per_category"] for n, r in payload["variants"].items()}
    return "Test image AUROC per category", "embed_dim D", {w: r["per_category"] for w, r in payload["widths"].items()}


STEMS = sorted(
    path.stem
    for prefix in ("experiments_", "ablation_", "condition_width_")
    for path in RESULTS.glob(f"{prefix}*.json")
)


@pytest.mark.parametrize("stem", STEMS)
def test_per_category_table_rebuilds_the_committed_table_from_its_json(stem):
    title, column, rows = rows_of(stem)
    assert len(rows) >= 2
    table = per_category_table(title, column, rows)
    assert f"\n\n{table}\n" in (RESULTS / f"{stem}.md").read_text()


def test_per_category_table_shows_a_missing_category_as_nan_and_right_aligns_numeric_rows():
    table = per_category_table("Figure", "width", {"16": {"a": 0.5}, "32": {"a": 0.25, "b": 1.0}}).splitlines()
    assert table == [
        "Figure:",
        "",
        "| width | a | b |",
        "|---:|---:|---:|",
        "| 16 | 50.0 | nan |",
        "| 32 | 25.0 | 100.0 |",
    ]
    assert per_category_table("Figure", "model", {"cflow": {"a": 1.0}}).splitlines()[3] == "|---|---:|"


def test_publish_writes_json_md_and_the_readme_block_with_plot_links_into_bench_results(tmp_path, monkeypatch):
    import bench.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "README", tmp_path / "README.md")
    common.README.write_text("intro\n<!-- demo:default -->\nold\n<!-- /demo:default -->\nrest\n")
    table = "| a |\n|---:|\n| 1 |\n\nTraining curves: [demo_loss.svg](demo_loss.svg) (per epoch)."
    text = common.publish("demo_default", {"rows": [1]}, table, "demo:default")

    assert text == (tmp_path / "results/demo_default.md").read_text() and text.endswith(table + "\n")
    assert json.loads((tmp_path / "results/demo_default.json").read_text())["rows"] == [1]
    readme = common.README.read_text()
    assert readme.startswith("intro\n<!-- demo:default -->\n_") and readme.endswith("<!-- /demo:default -->\nrest\n")
    assert "[demo_loss.svg](bench/results/demo_loss.svg)" in readme and "old" not in readme
