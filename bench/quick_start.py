"""How long the README's quick-start commands take in a fresh clone: what a newcomer (and CI) waits for.

    python -m bench.quick_start               # clones HEAD into a temporary folder beside ../shared and times it

Runs the steps of .ci/run one by one in a fresh clone of the committed HEAD (uncommitted changes are not in it):
`make install` (a new .venv from the local package index), `make test-fast`, `make test`, `make run`, then the
dvc.lock check. Writes bench/results/quick_start_fresh_clone.{md,json} and the README's quick-start block. A failing step stops
the run with its log's tail; nothing is written then.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import cpu_flags, publish

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    ("make install", ["make", "install"], "a new .venv, the pinned packages"),
    ("make test-fast", ["make", "test-fast"], "all but the tests marked `slow`"),
    ("make test", ["make", "test"], "the whole suite (what CI runs)"),
    ("make run", ["make", "run"], "`dvc repro` on the embedded default, from nothing"),
]


def timed(command: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{' '.join(command)} failed (exit {code}) in {cwd}; its log ends:\n{tail}")
    return time.perf_counter() - started


def pytest_summary(log: Path) -> str:
    """pytest's last line: 'N passed, M skipped in S s'."""
    found = re.findall(r"^=*\s*(\d+ passed.*?) in [\d.]+s", log.read_text(), re.M)
    return found[-1] if found else ""


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="quick-start-") as folder:
        work = Path(folder)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "vqflow")], check=True)
        (work / "shared").symlink_to(Path(args.shared).resolve())
        clone, rows = work / "vqflow", []
        for name, command, what in STEPS:
            log = work / f"{name.replace(' ', '_')}.log"
            print(f"== {name}", flush=True)
            seconds = timed(command, clone, log)
            rows.append({"step": name, "what": what, "seconds": seconds, "tests": pytest_summary(log)})
            print(f"   {minutes(seconds)} {rows[-1]['tests']}", flush=True)
        timed([str(clone / ".venv/bin/python"), ".ci/lock_unchanged.py"], clone, work / "lock.log")
    total = sum(r["seconds"] for r in rows)
    flags = cpu_flags()
    kind = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    lines = [
        "| command | what | time on 2 cores |",
        "|---|---|---:|",
        *(
            f"| `{r['step']}` | {r['what']}{': ' + r['tests'] if r['tests'] else ''} | {minutes(r['seconds'])} |"
            for r in rows
        ),
        "",
        f"Measured in a fresh clone of commit {commit.stdout.strip()} by `python -m bench.quick_start` (the steps of "
        f"`.ci/run`, {minutes(total)} together) on {'an' if kind[0] in 'AE' else 'a'} {kind} machine (training is pinned to AVX2 kernels there "
        "too, as on every x86 machine); `make run` and `make test` install first when .venv is missing.",
    ]
    text = "\n".join(lines)
    print(publish("quick_start_fresh_clone", {"steps": rows, "cpu_flags": flags}, text, "quick_start:fresh_clone"))


if __name__ == "__main__":
    main()
