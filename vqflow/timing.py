"""Wall-clock figures of the stages (seconds, images per second), kept apart from every DVC output.

A stage's outputs must be the same bytes whenever its inputs are (dvc.lock then says what the code produced, and
`dvc metrics diff` between two commits shows what a change did); timings differ on every run. They go to one
JSON file (``outputs.timing``), which dvc.yaml does not declare and git ignores: {stage: {figure: value}}.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import read_json, write_json


def timing_path(params: dict) -> Path:
    """``outputs.timing``; without it, timing.json beside ``outputs.metrics``."""
    outputs = params.get("outputs", {})
    return Path(outputs.get("timing") or Path(outputs.get("metrics", "metrics/metrics.json")).parent / "timing.json")


def record(params: dict, stage: str, **figures: float | list[float] | None) -> None:
    """Replace ``stage``'s figures in the timing file (written atomically; other stages' figures are kept)."""
    path = timing_path(params)
    current = read(params)
    current[stage] = figures
    write_json(path, current)


def read(params: dict) -> dict:
    """{stage: figures} of the last runs; {} when nothing was timed yet (or the file is unreadable)."""
    path = timing_path(params)
    try:
        return read_json(path) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
