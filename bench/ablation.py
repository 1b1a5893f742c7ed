"""VQ-Flow's parts one at a time (paper Table 4: CPC / CSPC / CADM / PE, and the naive CAPC), beside the
other models, on the default or the real suite, through the pipeline's own stages and evaluator.

    python bench/ablation.py --suite default
    python bench/ablation.py --suite real --shared ../shared
    python bench/ablation.py --suite default --variants vqflow msflow        # a subset

Runs prepare -> features once per suite, then train -> evaluate per variant in bench/.work/ablation/<suite>/
(never committed; trained models are reused through the training checkpoints when nothing changed). Thresholds
come from held-out normal images; no number is chosen on the test split. Writes bench/results/ablation_<suite>.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import per_category_table, publish, training_curves_note  # noqa: E402
from bench.experiments import METRICS, suite_params  # noqa: E402
from vqflow.io import read_json  # noqa: E402

# name -> (model.name, overrides of model.vqflow): the published MSFlow, then VQ-Flow's parts added one by one
# (paper Table 4), then each part's alternative
VARIANTS: dict[str, tuple[str, dict]] = {
    "msflow (PE condition, N(0, I))": ("msflow", {}),
    "+CPC": ("vqflow", {"cspc": False, "cadm": False}),
    "+CPC+CADM": ("vqflow", {"cspc": False}),
    "+CPC+CADM+CSPC = vqflow": ("vqflow", {}),
    "vqflow without PE": ("vqflow", {"pe": False}),
    "vqflow, naive CAPC": ("vqflow", {"cspc_mode": "naive"}),
    "vqflow, CADM before fusion": ("vqflow", {"cadm_placement": "parallel"}),
    "vqflow, soft CADM mixture": ("vqflow", {"cadm_mixture": "soft"}),
    # the released code sums the NLL over an image's ~9e4 latent dimensions and adds the VQ losses with weight 1:
    # relative to our per-dimension NLL that is VQ weights of ~1 / 9e4
    "vqflow, released loss balance": ("vqflow", {"lambda_cpc": 1.1e-5, "lambda_cspc": 1.1e-5}),
    "padim": ("padim", {}),
    "cflow": ("cflow", {}),
    "vitad": ("vitad", {}),
}
DEFAULT_VARIANTS = [name for name in list(VARIANTS)[:10] if name != "vqflow, soft CADM mixture"]


def variant_params(base: dict, work: Path, name: str) -> dict:
    model_name, overrides = VARIANTS[name]
    params = copy.deepcopy(base)
    params["model"]["name"] = model_name
    params["model"]["vqflow"] = {**params["model"]["vqflow"], **overrides}
    out = work / "runs" / re.sub(r"[^A-Za-z0-9]+", "_", name.replace("+", "plus ")).strip("_")
    params["outputs"] = {
        **params["outputs"],
        "weights": str(out / "weights"),
        "thresholds": str(out / "thresholds.json"),
        "model": str(out / "model"),
        "checkpoints": str(work / "checkpoints"),
        "timing": str(out / "timing.json"),
        "train_log": str(out / "train_log.json"),
        "metrics": str(out / "metrics.json"),
        "scores": str(out / "scores.csv"),
        "plots": str(out / "plots"),
        "curves": str(out / "curves"),  # not the repository's metrics/curves
        "report": str(out / "report.md"),
    }
    return params


def ablation_base(suite: str, shared: str) -> tuple[dict, Path]:
    """(params every row starts from, work dir) of a suite: the suite's params with its own manifest and cache."""
    work = ROOT / "bench/.work/ablation" / suite
    base = suite_params(yaml.safe_load((ROOT / "params.yaml").read_text()), suite, shared)
    # the parts are compared at one budget: every VQ-Flow row trains with MSFlow's (a suite may give VQ-Flow a
    # shorter one, for time)
    per_model = base["train"]["per_model"]
    per_model["vqflow"] = per_model["msflow"]
    base["prepare"]["manifest"] = str(work / "manifest.csv")
    base["features"]["cache"] = str(work / "features")
    return base, work


def prepared_ablation_base(suite: str, shared: str) -> tuple[dict, Path]:
    """``ablation_base`` with its data generated (default suite), its manifest prepared and its features cached."""
    from vqflow import stages

    base, work = ablation_base(suite, shared)
    if suite == "default":
        stages.run("generate", base)
    stages.run("prepare", base)
    stages.run("features", base)
    return base, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=["default", "real"])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    args = parser.parse_args()

    from vqflow import stages, timing

    base, work = prepared_ablation_base(args.suite, args.shared)
    results, run_params = {}, {}
    for name in args.variants:
        params = run_params[name] = variant_params(base, work, name)
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        stages.run_all(params, stages.MODEL)
        metrics = stages.run("evaluate", params)
        results[name] = {
            "model": params["model"]["name"],
            "overrides": VARIANTS[name][1],
            **metrics["mean"],
            "per_category": {c: v["image_auroc"] for c, v in metrics["per_category"].items()},
            "train_seconds": timing.read(params)["train"]["training_seconds"],
            "epochs": metrics["epochs"],
            "wall_seconds": time.perf_counter() - started,
        }
        print("   " + " ".join(f"{label} {100 * metrics['mean'][key]:.1f}" for key, label in METRICS), flush=True)
    lines = [
        "| variant | " + " | ".join(label for _, label in METRICS) + " | train s |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for name, r in results.items():
        budget = f"{r['epochs']} ep" if r["epochs"] else "fit only"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * r[key]:.1f}" for key, _ in METRICS)
            + f" | {r['train_seconds']:.0f} ({budget}) |"
        )
    lines += [
        "",
        per_category_table("Image AUROC per category", "variant", {n: r["per_category"] for n, r in results.items()}),
    ]
    note = (
        f"\n\n`python bench/ablation.py --suite {args.suite}`: the pipeline's stages and evaluator, one unified model "
        "per row, thresholds on held-out normals; switches from params.yaml `model.vqflow` (rows name what is on)."
    )
    stem = f"ablation_{args.suite}"
    note += training_curves_note(stem, {n: read_json(Path(run_params[n]["outputs"]["train_log"])) for n in results})
    print(publish(stem, {"suite": args.suite, "variants": results}, "\n".join(lines) + note, f"ablation:{args.suite}"))


if __name__ == "__main__":
    main()
