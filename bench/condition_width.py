"""VQ-Flow's condition width (`model.vqflow.embed_dim`, D: the quantized pattern each flow is conditioned on, ours
32, the paper's 256), judged like the image score and the map: on validation images with synthetic defects.

    python bench/condition_width.py --suite default                 # ours (32) and 64
    python bench/condition_width.py --suite default --widths 16 128   # ours and these

Each width is the ablation's VQ-Flow row (bench/ablation.py: same data, budget and evaluator) with only embed_dim
changed, trained in bench/.work/ablation/<suite>/width_<D>/. The validation columns are bench/score_rules.py's:
each category's held-out normals against copies with one small synthetic defect each, scored with the image
score and the anomaly map params.yaml selects. A width would replace ours only if it beat ours by more than
bench/score_rules.py's margin (0.5 points) in validation image AUROC or in the validation pixel mean without
losing more than the margin in the other; the test columns are reported after that decision.
Writes bench/results/condition_width_<suite> and the README block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ablation import prepared_ablation_base, variant_params  # noqa: E402
from bench.common import per_category_table, publish, training_curves_note  # noqa: E402
from bench.experiments import METRICS  # noqa: E402
from bench.score_rules import MARGIN, chosen_map, chosen_rule, score_table  # noqa: E402
from vqflow.io import read_json  # noqa: E402

VQFLOW_ROW = "+CPC+CADM+CSPC = vqflow"


def width_params(base: dict, work: Path, width: int) -> dict:
    """The ablation's VQ-Flow row with condition width ``width``, its outputs in its own run directory."""
    params = variant_params(base, work, VQFLOW_ROW)
    params["model"]["vqflow"]["embed_dim"] = width
    row_dir = str(Path(params["outputs"]["model"]).parent)
    params["outputs"] = {
        key: value.replace(row_dir, str(work / f"width_{width}")) if isinstance(value, str) else value
        for key, value in params["outputs"].items()
    }
    return params


def clears_margin(image_gain: float, pixel_gain: float) -> bool:
    """A gain of more than the margin in one validation figure, no loss of more than the margin in the other."""
    return max(image_gain, pixel_gain) > MARGIN and min(image_gain, pixel_gain) >= -MARGIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=["default", "real"])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    parser.add_argument("--widths", nargs="+", type=int, default=[64], help="besides ours (params.yaml)")
    args = parser.parse_args()

    from vqflow import stages, timing

    ours = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["vqflow"]["embed_dim"]
    widths = sorted(set(args.widths) | {ours})
    base, work = prepared_ablation_base(args.suite, args.shared)
    results, run_params = {}, {}
    for width in widths:
        params = run_params[width] = width_params(base, work, width)
        print(f"== embed_dim {width}", flush=True)
        stages.run_all(params, stages.MODEL)
        metrics = stages.run("evaluate", params)
        rules, maps, _, _ = score_table(args.suite, params, Path(params["outputs"]["model"]), f"embed_dim {width}")
        results[width] = {
            "validation_image_auroc": rules[chosen_rule(params)]["validation"]["mean"],
            "validation_pixel_mean": maps[chosen_map(params)]["pixel_mad"],
            **metrics["mean"],
            "per_category": {c: v["image_auroc"] for c, v in metrics["per_category"].items()},
            "train_seconds": timing.read(params)["train"]["training_seconds"],
            "epochs": metrics["epochs"],
        }
    reference = results[ours]
    pe = base["model"]["vqflow"]["pe_channels"] if base["model"]["vqflow"]["pe"] else 0
    lines = [
        "| embed_dim D | condition channels | validation I-AUROC | validation pixel mean | vs ours | replaces ours | "
        + " | ".join(f"test {label}" for _, label in METRICS)
        + " | train s |",
        "|---:|---:|---:|---:|---|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for width, r in results.items():
        image_gain = r["validation_image_auroc"] - reference["validation_image_auroc"]
        pixel_gain = r["validation_pixel_mean"] - reference["validation_pixel_mean"]
        verdict = "(ours)" if width == ours else ("**yes**" if clears_margin(image_gain, pixel_gain) else "no")
        lines.append(
            f"| {width} | {width + pe} | {100 * r['validation_image_auroc']:.1f} | "
            f"{100 * r['validation_pixel_mean']:.1f} | {100 * image_gain:+.1f} / {100 * pixel_gain:+.1f} | {verdict} | "
            + " | ".join(f"{100 * r[key]:.1f}" for key, _ in METRICS)
            + f" | {r['train_seconds']:.0f} ({r['epochs']} ep) |"
        )
    lines += [
        "",
        per_category_table(
            "Test image AUROC per category", "embed_dim D", {w: r["per_category"] for w, r in results.items()}
        ),
    ]
    command = f"python bench/condition_width.py --suite {args.suite} --widths {' '.join(map(str, args.widths))}"
    note = (
        f"\n\n`{command}`: the ablation's VQ-Flow row ({args.suite} suite) "
        f"with only `model.vqflow.embed_dim` changed; condition channels = D + {pe} positional channels. Validation: "
        "held-out normals + synthetic defects (bench/score_rules.py), image AUROC of the image score and mean of the "
        "pixel AUROC, AP, F1-max and AUPRO of the anomaly map params.yaml selects; vs ours: image / pixel difference. "
        f"A width replaces ours only past the {100 * MARGIN:.1f}-point margin; test columns reported after that."
    )
    stem = f"condition_width_{args.suite}"
    note += training_curves_note(
        stem, {f"embed_dim {w}": read_json(Path(run_params[w]["outputs"]["train_log"])) for w in results}
    )
    payload = {"suite": args.suite, "ours": ours, "widths": {str(w): r for w, r in results.items()}}
    print(publish(stem, payload, "\n".join(lines) + note, f"condition_width:{args.suite}"))


if __name__ == "__main__":
    main()
