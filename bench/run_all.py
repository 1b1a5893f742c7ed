"""`make bench`: every benchmark in turn, then bench/results/SUMMARY.md and the README's benchmark block.

Long (DVC experiments of every model on the default and the real data, CIFAR-10 splits, anomalib): hours on
2 cores. `python bench/run_all.py --only inference pipeline` runs some; `--summary` only rebuilds the summary.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench/results"
SHARED = ROOT.parent / "shared"
PEER_PYTHON = ROOT / ".venv-peer/bin/python"

# name -> (command, results file stem, title); run in this order
STEPS = {
    "experiments-default": (
        [sys.executable, "bench/experiments.py", "run", "--suite", "default"],
        "experiments_default",
        "Every model on the embedded default dataset (DVC experiments)",
    ),
    "experiments-real": (
        [sys.executable, "bench/experiments.py", "run", "--suite", "real", "--shared", "../shared"],
        "experiments_real",
        "Every model on MVTec AD bottle + Magnetic Tile, one unified model",
    ),
    "ablation-default": (
        [sys.executable, "bench/ablation.py", "--suite", "default"],
        "ablation_default",
        "VQ-Flow's parts (paper Table 4) on the default dataset",
    ),
    "seeds-default": (
        [sys.executable, "bench/seeds.py", "--suite", "default"],
        "seeds_default",
        "How far the default-suite rows move with the training seed",
    ),
    "score-rules-default": (
        [sys.executable, "bench/score_rules.py", "--suite", "default", "--experiment", "default-vqflow"],
        "score_rules_default",
        "Image score rules on one trained VQ-Flow (default dataset)",
    ),
    "score-rules-real": (
        [sys.executable, "bench/score_rules.py", "--suite", "real", "--experiment", "real-vqflow"],
        "score_rules_real",
        "Image score rules on one trained VQ-Flow (real data)",
    ),
    "condition-width-default": (
        [sys.executable, "bench/condition_width.py", "--suite", "default"],
        "condition_width_default",
        "VQ-Flow's condition width on the default dataset",
    ),
    "pipeline": ([sys.executable, "bench/pipeline.py"], "pipeline", "Feature extraction, training and metrics"),
    "inference": ([sys.executable, "bench/inference.py"], "inference", "Inference speed (256 px, EfficientNet-Lite0)"),
    "aupro": ([sys.executable, "bench/aupro.py"], "aupro", "AUPRO: ours vs. the slow exact reference"),
    "scale": (
        [sys.executable, "bench/scale.py"],
        "scale",
        "Scale: peak memory and time per image as the training set grows",
    ),
    "service": ([sys.executable, "bench/service_load.py"], "service_load", "`bentoml serve` under load"),
    "feedback": (
        [sys.executable, "bench/feedback_loop.py"],
        "feedback_loop",
        "Operators' feedback: false alarms to /feedback, then the retrain flow",
    ),
    "cifar": (
        [sys.executable, "bench/cifar.py", "--shared", str(SHARED)],
        "cifar10",
        "CIFAR-10 semantic anomaly detection",
    ),
    "cifar-ceiling": (
        [sys.executable, "bench/cifar_ceiling.py", "--shared", str(SHARED)],
        "cifar10_ceiling",
        "CIFAR-10: what the packaged backbones' frozen features separate (no training)",
    ),
    "peer": (
        [str(PEER_PYTHON), "bench/peer_anomalib.py"],
        "peer_anomalib",
        "Side by side with anomalib (same data, weights, resolution)",
    ),
}


def summary() -> Path:
    sections = [
        (stem, title, (RESULTS / f"{stem}.md").read_text().strip())
        for _, stem, title in STEPS.values()
        if (RESULTS / f"{stem}.md").is_file()
    ]
    intro = "Each table carries the date, commit and machine it was measured on (`python bench/run_all.py --summary`)."
    (RESULTS / "SUMMARY.md").write_text(
        "# Benchmark summary\n\n"
        + intro
        + "\n\n"
        + "\n\n".join(f"## {title}\n\n{text}" for _, title, text in sections)
        + "\n"
    )
    readme = ROOT / "README.md"
    # the README shows the experiment tables in their own sections (their own markers)
    block = "\n\n".join(
        f"#### {title}\n\n{text}"
        for stem, title, text in sections
        if not stem.startswith(("experiments_", "ablation_", "seeds_", "score_rules_", "condition_width_"))
    )
    pattern = re.compile(r"(<!-- bench:summary -->\n).*?(<!-- /bench:summary -->)", re.S)
    text = readme.read_text()
    if pattern.search(text):
        readme.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text))
    return RESULTS / "SUMMARY.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    parser.add_argument("--summary", action="store_true", help="only rebuild the summary from existing results")
    args = parser.parse_args()
    failed = []
    for name in [] if args.summary else args.only or list(STEPS):
        command = STEPS[name][0]
        if name in ("experiments-real", "score-rules-real", "cifar", "cifar-ceiling") and not SHARED.is_dir():
            print(f"-- {name}: skipped, {SHARED} is absent", flush=True)
            continue
        if name == "peer" and not PEER_PYTHON.is_file():
            print("-- peer: skipped, no .venv-peer (run `make peer-env`)", flush=True)
            continue
        print(f"-- {name}: {' '.join(command)}", flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            failed.append(name)
    if not args.only or args.summary:
        print(f"summary: {summary()}")
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
