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


def registered_models() -> list[str]:
    """Every model of the registry, VQ-Flow first (the tables compare the others with it)."""
    from vqflow.models import available_models

    return sorted(available_models(), key=lambda name: (name != "vqflow", name))


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
