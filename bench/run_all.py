"""`make bench`: run every benchmark script of this folder in turn (results in bench/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["aupro.py", "service_load.py"]

if __name__ == "__main__":
    failed = [s for s in SCRIPTS if subprocess.run([sys.executable, str(HERE / s)], cwd=HERE.parent).returncode != 0]
    if failed:
        sys.exit(f"benchmarks failed: {failed}")
