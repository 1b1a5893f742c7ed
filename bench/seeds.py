"""How far a model's test metrics move with the training seed alone: same data, params and evaluator, only
`train.seed` changes (initialisation, batch order, codebook restarts); the held-out split (`prepare.seed`) stays.

    python bench/seeds.py --suite default                        # vqflow, msflow, cflow; seeds 0 1 2
    python bench/seeds.py --suite default --variants cflow --seeds 0 1 2 3 4

A difference between two models smaller than their seed spread is not one a user can rely on. Runs in
bench/.work/seeds/<suite>/ on bench/ablation.py's manifest and feature cache (variants are its rows); writes
bench/results/seeds_<suite> and the README block after every run, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ablation import VARIANTS, prepared_ablation_base, variant_params  # noqa: E402
from bench.common import publish  # noqa: E402
from bench.experiments import METRICS  # noqa: E402
from vqflow import timing  # noqa: E402

DEFAULT_VARIANTS = ["+CPC+CADM+CSPC = vqflow", "msflow (PE condition, N(0, I))", "cflow"]


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation, in points; a lone value (the table is written after every run, so a
    variant's first seed shows before its second) without a spread."""
    if len(values) < 2:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(suite: str, runs: dict[str, dict[int, dict]]) -> str:
    lines = [
        "| variant | seeds | " + " | ".join(label for _, label in METRICS) + " | mAD per seed | train s (mean) |",
        "|---|---|" + "---:|" * (len(METRICS) + 2),
    ]
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        cells = [spread([by_seed[s][key] for s in seeds]) for key, _ in METRICS]
        per_seed = " / ".join(f"{100 * by_seed[s]['mad']:.1f}" for s in seeds)
        seconds = statistics.fmean(by_seed[s]["train_seconds"] for s in seeds)
        lines.append(
            f"| {name} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + f" | {per_seed} | {seconds:.0f} |"
        )
    note = (
        f"\n\n`python bench/seeds.py --suite {suite}`: mean ± sample standard deviation over the training seeds "
        "(`train.seed`; data, held-out split, params and evaluator unchanged), the pipeline's stages run in-process "
        "as in bench/ablation.py. Rows of a model differ from its experiment row only by the seed and by kernel "
        "rounding (in-process runs do not pin the CLI's AVX2 kernels)."
    )
    return "\n".join(lines) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=["default", "real"])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds: at least two seeds (a spread needs two)")

    from vqflow import stages

    base, _ = prepared_ablation_base(args.suite, args.shared)
    runs: dict[str, dict[int, dict]] = {}
    for name in args.variants:
        for seed in args.seeds:
            params = variant_params(base, ROOT / "bench/.work/seeds" / args.suite / f"seed{seed}", name)
            params["train"]["seed"] = seed
            print(f"== {name}, seed {seed}", flush=True)
            started = time.perf_counter()
            stages.run_all(params, stages.MODEL)
            metrics = stages.run("evaluate", params)
            runs.setdefault(name, {})[seed] = {
                **metrics["mean"],
                "train_seconds": timing.read(params)["train"]["training_seconds"],
                "epochs": metrics["epochs"],
                "wall_seconds": time.perf_counter() - started,
            }
            print("   " + " ".join(f"{label} {100 * metrics['mean'][key]:.1f}" for key, label in METRICS), flush=True)
            text = publish(
                f"seeds_{args.suite}",
                {"suite": args.suite, "runs": runs},
                table(args.suite, runs),
                f"seeds:{args.suite}",
            )
    print(text)


if __name__ == "__main__":
    main()
