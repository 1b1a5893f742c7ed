"""Shared helpers of the benchmark scripts: machine facts, timing, and writing JSON + markdown results."""

from __future__ import annotations

import json
import os
import re
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS.parents[1] / "README.md"


def registered_models() -> list[str]:
    """Every model of the registry, VQ-Flow first (the tables compare the others with it)."""
    from vqflow.models import available_models

    return sorted(available_models(), key=lambda name: (name != "vqflow", name))


def cpu_flags() -> list[str]:
    """The CPU's vector-extension flags that decide kernel speed (AVX2, AVX-512, VNNI, AMX)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit or "unknown",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def quiet_offline_env(work: Path) -> dict[str, str]:
    """The environment of a benchmark's subprocesses: its own BentoML and Prefect homes under ``work``, no
    network, no telemetry, no progress bars, this interpreter's tools first on PATH."""
    return {
        **os.environ,
        "BENTOML_HOME": str(work / "bentoml"),
        "PREFECT_HOME": str(work / "prefect"),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def write_results(name: str, payload: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    header = (
        f"_{m['date']}, commit {m['commit']}, {m['cpus']} cores, torch {m['torch']} ({m['torch_threads']} threads)_\n\n"
    )
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    return RESULTS / f"{name}.md"


def replace_readme_block(readme: Path, marker: str, text: str) -> bool:
    """Put ``text`` between ``<!-- marker -->`` and ``<!-- /marker -->`` in the README; False if no markers."""
    if not readme.is_file():
        return False
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n).*?(<!-- /{re.escape(marker)} -->)", re.S)
    content = readme.read_text()
    if not pattern.search(content):
        return False
    readme.write_text(pattern.sub(lambda g: g.group(1) + text + g.group(2), content))
    return True


def linked_from_readme(text: str) -> str:
    """``text`` of a bench/results table with its links to the plots beside it pointed there from the README."""
    return re.sub(r"\]\(([^/()]+\.svg)\)", r"](bench/results/\1)", text)


def publish(name: str, payload: dict, table: str, marker: str) -> str:
    """Write bench/results/<name>.{json,md} and the README block ``marker``; the table's text."""
    text = write_results(name, payload, table).read_text()
    replace_readme_block(README, marker, linked_from_readme(text))
    return text


def per_category_table(title: str, column: str, rows: dict[str | int, dict[str, float]]) -> str:
    """A markdown table of one figure per category (columns) for each row (``column``: what a row is), in percent;
    a category a row lacks shows nan. Numeric row labels are right-aligned like the figures."""
    categories = sorted({category for per_category in rows.values() for category in per_category})
    align = "---:" if all(str(label).isdigit() for label in rows) else "---"
    return "\n".join(
        [
            f"{title}:",
            "",
            f"| {column} | " + " | ".join(categories) + " |",
            f"|{align}|" + "---:|" * len(categories),
            *(
                f"| {label} | " + " | ".join(f"{100 * figures.get(c, float('nan')):.1f}" for c in categories) + " |"
                for label, figures in rows.items()
            ),
        ]
    )


def training_curves_note(name: str, histories: dict[str, list[dict]]) -> str:
    """Plot each row's flow NLL per epoch (``histories``: row -> train_log.json) to bench/results/<name>_loss.svg;
    the sentence that links the plot."""
    from vqflow.plots import loss_curves

    curves = loss_curves(histories, RESULTS / f"{name}_loss.svg")
    return f"\n\nTraining curves: [{curves.name}]({curves.name}) (flow NLL per latent dimension, per epoch)."
