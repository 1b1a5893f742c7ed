"""How a trained VQ-Flow turns per-pixel likelihoods into an image score: every candidate rule on the same model.

    python bench/score_rules.py --suite default     # after `python bench/ablation.py --suite default`
    python bench/score_rules.py --suite real --experiment real-vqflow   # the model of a DVC experiment

Loads the full VQ-Flow of the ablation run (bench/.work/ablation/<suite>/), computes its per-scale log p maps
once for the training and the test images, and scores the test images with each rule. The rule the model uses
(`model.vqflow.normalization` / `top_k`) was chosen by argument and on these development sets; this table is
the record of that choice, not a search on the reported run. Writes bench/results/score_rules_<suite>.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ablation import variant_params  # noqa: E402
from bench.common import replace_readme_block, write_results  # noqa: E402
from bench.experiments import suite_params  # noqa: E402
from vqflow.bundle import CONFIG  # noqa: E402

FULL_MODEL = "+CPC+CADM+CSPC = vqflow"


def log_p_maps(model, cache, ids: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-scale log p maps (3 tensors (N, h, w)) and the total log-likelihood (N,) of the images ``ids``."""
    maps, totals = [], []
    with torch.inference_mode():
        for start in range(0, len(ids), 16):
            zs, logdet, proto_q, _ = model.encode(cache.get(ids[start : start + 16]))
            maps.append(model.log_p_maps(zs, proto_q))
            totals.append(model.log_likelihood(zs, logdet, proto_q))
    return [torch.cat([m[level] for m in maps]) for level in range(3)], torch.cat(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=["default", "real"])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument(
        "--experiment",
        help="use this DVC experiment's trained model instead of the ablation's "
        "(`dvc exp apply` into the workspace, restored to HEAD afterwards)",
    )
    args = parser.parse_args()
    if args.experiment:
        # `dvc exp apply` rewrites tracked files with the experiment's versions: only on a clean work tree, which
        # is restored to HEAD afterwards; the results are written after that
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        if dirty:
            raise SystemExit(f"--experiment needs a clean work tree (commit or stash first):\n{dirty}")
        subprocess.run(["dvc", "exp", "apply", args.experiment], cwd=ROOT, check=True)
        try:
            params = yaml.safe_load((ROOT / "params.yaml").read_text())
            table = score_table(args.suite, params, Path(params["outputs"]["model"]), f"experiment {args.experiment}")
        finally:
            subprocess.run(["git", "checkout", "HEAD", "--", "."], cwd=ROOT, check=True)
            subprocess.run(["dvc", "checkout", "--quiet"], cwd=ROOT, check=False)
        write_table(args.suite, *table)
        return
    work = ROOT / "bench/.work/ablation" / args.suite
    base = suite_params(yaml.safe_load((ROOT / "params.yaml").read_text()), args.suite, args.shared)
    base["prepare"]["manifest"] = str(work / "manifest.csv")
    base["features"]["cache"] = str(work / "features")
    model_dir = Path(variant_params(base, work, FULL_MODEL)["outputs"]["model"])
    if not (model_dir / CONFIG).is_file():
        raise SystemExit(f"{model_dir}: no trained model; run `python bench/ablation.py --suite {args.suite}` first")
    write_table(args.suite, *score_table(args.suite, base, model_dir, "the ablation's full VQ-Flow"))


def score_table(suite: str, params: dict, model_dir: Path, source: str) -> tuple[dict, str, str]:
    """(results per rule, markdown table, source) of the model in ``model_dir`` on the suite's test split."""
    from vqflow import stages
    from vqflow.metrics import auroc
    from vqflow.bundle import load_model
    from vqflow.models.anomaly_map import add_map, floored_std, log_map, top_k_score, upsample

    manifest, cache = stages._manifest_and_cache(params)
    model, _ = load_model(model_dir)
    size = model.config.image_size
    train_maps, _ = log_p_maps(model, cache, manifest[manifest.split == "train"].image_id.tolist())

    def z_sum(log_p: list[torch.Tensor], per_position: bool) -> torch.Tensor:
        """sum_l upsample((-log p_l - mean_l) / std_l), statistics of the training images per position or per scale."""
        total = 0
        for m, train in zip(log_p, train_maps):
            nll = -train.double()
            mean, std = (nll.mean(0), nll.std(0, correction=0)) if per_position else (nll.mean(), nll.std(correction=0))
            std = floored_std(std)
            total = total + upsample(((-m.double() - mean) / std).float(), size)
        return total

    scale_max = [m.amax() for m in train_maps]
    total_max = sum(upsample(m, size) for m in train_maps).amax()
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    maps, log_likelihood = log_p_maps(model, cache, test.image_id.tolist())
    train_relative, image_relative = log_map(maps, size, total_max), log_map(maps, size)
    position, per_scale = z_sum(maps, True), z_sum(maps, False)
    rules = {
        "top 3 % of c_train - sum_l log p_l (our rule: MSFlow's top-k, training reference, log domain)": top_k_score(
            train_relative, 0.03
        ),
        "top 1 % of c_train - sum_l log p_l": top_k_score(train_relative, 0.01),
        "top 0.1 % of c_train - sum_l log p_l (about one stride-8 cell)": top_k_score(train_relative, 0.001),
        "max of c_train - sum_l log p_l": train_relative.flatten(1).amax(1),
        "top 3 % relative to the image's own max (MSFlow's normalisation, log domain)": top_k_score(
            image_relative, 0.03
        ),
        "top 3 % of the add map (training references)": top_k_score(add_map(maps, size, scale_max), 0.03),
        "max of the add map (training references)": add_map(maps, size, scale_max).flatten(1).amax(1),
        "- total log-likelihood (log p(x) with log-det)": -log_likelihood,
        "top 3 % of sum_l z_l, z_l = -log p_l standardised per position on the training images "
        "(`normalization: position`)": top_k_score(position, 0.03),
        "top 1 % of sum_l z_l (per position)": top_k_score(position, 0.01),
        "max of sum_l z_l (per position)": position.flatten(1).amax(1),
        "top 3 % of sum_l z_l, standardised per scale (one mean and std per scale)": top_k_score(per_scale, 0.03),
    }
    categories, labels = test.category.to_numpy(), test.label.to_numpy()
    names = sorted(set(categories.tolist()))
    results = {}
    for rule, scores in rules.items():
        per = {c: auroc(labels[categories == c], scores.numpy()[categories == c]) for c in names}
        results[rule] = {"per_category": per, "mean": float(np.mean(list(per.values())))}
    lines = ["| image score rule | " + " | ".join(names) + " | mean |", "|---|" + "---:|" * (len(names) + 1)]
    lines += [
        f"| {rule} | " + " | ".join(f"{100 * r['per_category'][c]:.1f}" for c in names) + f" | {100 * r['mean']:.1f} |"
        for rule, r in results.items()
    ]
    note = (
        f"\n\nImage AUROC of {source} ({suite} suite) under each rule, same model and maps. "
        "z_l statistics, c_train = fitted on the training images after training; log p_l = per-scale map, upsampled."
    )
    return results, "\n".join(lines) + note, source


def write_table(suite: str, results: dict, table: str, source: str) -> None:
    md = write_results(f"score_rules_{suite}", {"suite": suite, "model": source, "rules": results}, table)
    replace_readme_block(ROOT / "README.md", f"score_rules:{suite}", md.read_text())
    print(md.read_text())


if __name__ == "__main__":
    main()
