"""bench/seeds.py's table: mean ± sample standard deviation per metric, also when written after a variant's first
seed (the script rewrites the table after every run, so that an interrupted run keeps what it measured)."""

import numpy as np

from bench.experiments import METRICS
from bench.seeds import table


def _run(value: float) -> dict:
    return {**{key: value for key, _ in METRICS}, "train_seconds": 100.0}


def _row(text: str, variant: str) -> list[str]:
    [line] = [line for line in text.splitlines() if line.startswith(f"| {variant} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_first_seed_alone_is_shown_without_a_spread() -> None:
    cells = _row(table("default", {"vqflow": {0: _run(0.868)}}), "vqflow")
    assert cells[1] == "0"
    assert cells[2 : 2 + len(METRICS)] == ["86.8"] * len(METRICS)
    assert cells[-2:] == ["86.8", "100"]


def test_spread_is_the_sample_standard_deviation() -> None:
    values = {0: 0.868, 1: 0.866, 2: 0.872}
    text = table("default", {"vqflow": {seed: _run(v) for seed, v in values.items()}, "cflow": {0: _run(0.874)}})
    mean, std = 100 * np.mean(list(values.values())), 100 * np.std(list(values.values()), ddof=1)
    cells = _row(text, "vqflow")
    assert cells[1] == "0, 1, 2"
    assert cells[2] == f"{mean:.1f} ± {std:.1f}" == "86.9 ± 0.3"
    assert cells[-2] == "86.8 / 86.6 / 87.2"
    assert _row(text, "cflow")[2] == "87.4"
