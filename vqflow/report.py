"""Human-facing summaries of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(params: dict, console: Console | None = None) -> None:
    """A table per produced artefact: dataset counts by category and split, feature cache, metrics."""
    import pandas as pd

    console = console or Console()
    manifest = Path(params["prepare"]["manifest"])
    if manifest.is_file():
        frame = pd.read_csv(manifest, keep_default_na=False)
        table = Table(title=f"Dataset ({manifest})")
        for column in ("category", "train", "val", "test good", "test defective", "defect types"):
            table.add_column(column, justify="left" if column in ("category", "defect types") else "right")
        for category, rows in frame.groupby("category"):
            test = rows[rows.split == "test"]
            table.add_row(
                category, str((rows.split == "train").sum()), str((rows.split == "val").sum()),
                str((test.label == 0).sum()), str((test.label == 1).sum()),
                ", ".join(sorted(set(test[test.label == 1].defect_type))),
            )
        console.print(table)
    cache_index = Path(params["features"]["cache"]) / "index.json"
    if cache_index.is_file():
        index = json.loads(cache_index.read_text())
        size = sum(p.stat().st_size for p in cache_index.parent.glob("shard-*.safetensors"))
        console.print(
            f"Feature cache: {len(index['entries'])} images, backbone {index['backbone']['name']} "
            f"({index['backbone']['weights']}) at {index['backbone']['image_size']} px, "
            f"{size / 2**20:.1f} MiB in {len(index['shards'])} shards"
        )


def print_metrics(metrics: dict, console: Console | None = None) -> None:
    """Per-category metric table with the mean row last (values in percent)."""
    console = console or Console()
    names = list(metrics["mean"].keys())
    table = Table(title=f"Test metrics, model {metrics.get('model', '?')} (%)")
    table.add_column("category")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    rows = list(metrics["per_category"].items()) + [("mean", metrics["mean"])]
    for category, values in rows:
        table.add_row(category, *(f"{100 * values[n]:.1f}" for n in names), style="bold" if category == "mean" else None)
    console.print(table)
