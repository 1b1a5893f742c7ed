"""Human-facing summaries of a pipeline run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import timing
from .io import read_json
from .metrics import REPORTED


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=140)


def print_summary(params: dict, console: Console | None = None) -> None:
    """A table per produced artefact: dataset counts by category and split, feature cache, metrics."""
    import pandas as pd

    from .bundle import CONFIG, ModelBundle

    console = console or _console()
    manifest = Path(params["prepare"]["manifest"])
    if manifest.is_file():
        frame = pd.read_csv(manifest, keep_default_na=False)
        table = Table(title=f"Dataset ({manifest})")
        for column in ("category", "train", "val", "test good", "test defective", "defect types"):
            table.add_column(column, justify="left" if column in ("category", "defect types") else "right")
        for category, rows in frame.groupby("category"):
            test = rows[rows.split == "test"]
            table.add_row(
                category,
                str((rows.split == "train").sum()),
                str((rows.split == "val").sum()),
                str((test.label == 0).sum()),
                str((test.label == 1).sum()),
                ", ".join(sorted(set(test[test.label == 1].defect_type))),
            )
        console.print(table)
    cache_index = Path(params["features"]["cache"]) / "index.json"
    if cache_index.is_file():
        index = read_json(cache_index)
        files = list(cache_index.parent.glob("objects/*/*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        console.print(
            f"Feature cache: {len(index['entries'])} images, backbone {index['backbone']['name']} "
            f"({index['backbone']['weights']}) at {index['backbone']['image_size']} px, "
            f"{size / 2**20:.1f} MiB in {len(files)} entries"
        )
    outputs = params.get("outputs", {})
    model_dir = Path(outputs.get("model", "models/model"))
    if (model_dir / CONFIG).is_file():
        meta = ModelBundle(model_dir).meta
        timed = timing.read(params)
        console.print(
            f"Model: {meta['model']} trained on {meta.get('train_images', '?')} images for "
            f"{meta.get('train', {}).get('epochs', '?')} epochs in {timed.get('train', {}).get('seconds', float('nan')):.0f} s"
            f", scores {timed.get('evaluate', {}).get('fps', float('nan')):.1f} images/s -> {model_dir}"
        )
    metrics_path = Path(outputs.get("metrics", "metrics/metrics.json"))
    if metrics_path.is_file():
        print_metrics(read_json(metrics_path), console)


def print_metrics(metrics: dict, console: Console | None = None) -> None:
    """Per-category metric table with the mean row last (values in percent)."""
    console = console or _console()
    names = [n for n in REPORTED if n in metrics["mean"]]
    table = Table(title=f"Test metrics, model {metrics.get('model', '?')} (%)")
    table.add_column("category")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    rows = list(metrics["per_category"].items()) + [("mean", metrics["mean"])]
    for category, values in rows:
        table.add_row(
            category, *(f"{100 * values[n]:.1f}" for n in names), style="bold" if category == "mean" else None
        )
    console.print(table)


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}"


def metrics_markdown(metrics: dict) -> str:
    """The metric table (percent) as markdown: one row per category, the mean last."""
    names = [n for n in REPORTED if n in metrics["mean"]]
    lines = ["| category | " + " | ".join(n.replace("_", " ") for n in names) + " |", "|---|" + "---:|" * len(names)]
    for category, values in list(metrics["per_category"].items()) + [("**mean**", metrics["mean"])]:
        lines.append(f"| {category} | " + " | ".join(_pct(values[n]) for n in names) + " |")
    return "\n".join(lines)


def write_report(params: dict, meta: dict, metrics: dict, manifest, plot_paths: list[Path], path: str | Path) -> Path:
    """A markdown report of the run: model, data, params, metric tables and the plots."""
    import yaml

    from .io import write_text

    path = Path(path)
    counts = manifest.groupby(["category", "split"]).size().unstack(fill_value=0)
    decisions = metrics.get("at_threshold", {})
    decision_rows = "\n".join(
        f"| {c} | {d['threshold']:.4g} | {_pct(d['precision'])} | {_pct(d['recall'])} | {_pct(d['f1'])} | "
        f"{_pct(d['oracle_f1max'])} | {_pct(d['false_reject_rate'])} |"
        for c, d in decisions.items()
    )
    relative = [Path(p).resolve() for p in plot_paths]
    images = "\n".join(f"![{p.stem}]({_relpath(p, path.parent)})" for p in relative)
    # what trained this model, from its bundle (the params file may have changed since)
    configuration = {k: meta.get(k) for k in ("model", "config", "train", "backbone")}
    text = f"""# vqflow run report

Model **{meta["model"]}**, trained on {meta.get("train_images", "?")} normal images of all categories mixed
for {meta.get("epochs", "?")} epochs; backbone {meta.get("backbone", {}).get("name", "?")}
({meta.get("backbone", {}).get("weights", "?")}) at {meta.get("backbone", {}).get("image_size", "?")} px.
Wall-clock figures (training seconds, images per second) are in `{timing.timing_path(params)}`, not here: this
report, like every pipeline output, is the same file whenever the inputs are.

## Data

{counts.to_markdown() if hasattr(counts, "to_markdown") and _has_tabulate() else counts.to_string()}

## Test metrics (%)

{metrics_markdown(metrics)}

## Decisions at the calibrated thresholds (from validation normals only) vs. the oracle F1-max on test

| category | threshold | precision | recall | F1 | oracle F1-max | false-reject rate |
|---|---:|---:|---:|---:|---:|---:|
{decision_rows}

## Plots

{images}

## Configuration (the model bundle's config.json)

```yaml
{yaml.safe_dump(configuration, sort_keys=False)}```
"""
    write_text(path, text)
    return path


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start.resolve())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def print_validation(report, console: Console | None = None) -> None:
    """A table of the failed expectations with the offending files (errors and warnings)."""
    if report is None:
        return
    console = console or _console()
    if not report.failures:
        console.print("[green]Data validation passed: every expectation holds.[/green]")
        return
    table = Table(title="Data validation: failed expectations")
    for column in ("check", "level", "rows", "what is wrong", "files (first 5)"):
        table.add_column(column)
    for f in report.failures:
        table.add_row(
            f.check, "warning" if f.warning else "ERROR", str(f.count), f.reason, "\n".join(f.described()) or f.column
        )
    console.print(table)
