"""How a trained VQ-Flow turns per-pixel likelihoods into an image score: every candidate rule on the same model.

    python bench/experiments.py run --suite default --models vqflow      # the model to score, then:
    python bench/score_rules.py --suite default --experiment default-vqflow   # or --workspace (`make run`'s model)
    python bench/score_rules.py --suite real --experiment real-vqflow
    python bench/score_rules.py --suite real --ablation-variant "+CPC+CADM+CSPC = vqflow"   # or a bench/ablation.py row

Computes the model's per-scale log p maps once for the training images, the validation images and the test
images, and scores them with each rule. Two columns per rule:
- **validation**: the held-out normal images of each category (never trained on) against copies of the same
  images with one small synthetic defect each (a rectangle cut from another normal image, a soft darker or
  brighter spot, a thin scratch; 0.2-2 % of the image, the size of real surface defects). This is where a rule
  is chosen: it uses no test image, and the defects are not the test split's kinds.
- **test**: the suite's test split, reported after the choice.
Writes bench/results/score_rules_<suite> and the README block.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, publish  # noqa: E402
from bench.experiments import restore_committed  # noqa: E402
from vqflow.io import read_json  # noqa: E402
from vqflow.models.vqflow import VQFlowConfig  # noqa: E402

DEFECTS = ("patch", "spot", "scratch")
TRAIN_RULE = "top 3 % of c_train - sum_l log p_l (MSFlow's top-k, training reference, log domain)"
IMAGE_RULE = "top 3 % relative to the image's own max (MSFlow's normalisation, log domain)"
GLOBAL_RULE = (
    "the c_train rule + {weight} x -log p of the pooled stride-32 feature (`global_gaussian`, weight {weight})"
)
POSITION_RULE = "top 3 % of sum_l z_l, z_l = -log p_l standardised per position on the training images"


def synthetic_defect(
    image: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(copy of ``image`` (float CHW in [0, 1]) with one small defect, its mask (bool HW)): ``patch`` pastes a
    rectangle of ``donor`` (another normal image of the category: CutPaste), ``spot`` a soft-edged ellipse and
    ``scratch`` a thin line, both darker or brighter by 0.25-0.5 (mask: where the change is at least half of it).
    Placed in the central 70 % of the image."""
    size = image.shape[-1]
    out = image.copy()
    defect_mask = np.zeros((size, size), dtype=bool)
    low, high = int(0.15 * size), int(0.85 * size)
    if kind == "patch":
        area = rng.uniform(0.005, 0.02) * size * size
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        h = int(np.clip(math.sqrt(area * aspect), 2, size // 4))
        w = int(np.clip(area / h, 2, size // 4))
        sy, sx = rng.integers(0, size - h), rng.integers(0, size - w)
        ty, tx = rng.integers(low, high - h), rng.integers(low, high - w)
        out[:, ty : ty + h, tx : tx + w] = donor[:, sy : sy + h, sx : sx + w]
        defect_mask[ty : ty + h, tx : tx + w] = True
        return out, defect_mask
    mask = Image.new("L", (size, size))
    draw = ImageDraw.Draw(mask)
    cy, cx = rng.uniform(low, high, 2)
    if kind == "spot":
        radius = math.sqrt(rng.uniform(0.002, 0.01) * size * size / math.pi)
        stretch = math.sqrt(rng.uniform(0.5, 2.0))
        draw.ellipse(
            [cx - radius / stretch, cy - radius * stretch, cx + radius / stretch, cy + radius * stretch], fill=255
        )
    elif kind == "scratch":
        half, angle = rng.uniform(0.05, 0.15) * size, rng.uniform(0, math.pi)
        dx, dy = half * math.cos(angle), half * math.sin(angle)
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=int(rng.integers(2, 4)))
    else:
        raise ValueError(f"unknown synthetic defect {kind!r}: one of {DEFECTS}")
    alpha = gaussian_filter(np.asarray(mask, dtype=np.float32) / 255.0, 1.0)
    shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.5))
    return np.clip(out + shift * alpha[None], 0.0, 1.0), alpha >= 0.5


def validation_images(
    manifest, size: int, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(images, categories, labels, masks): each category's validation normals, then one copy of each with every
    kind of synthetic defect (the donor of a patch is the category's next validation image)."""
    from vqflow.features import load_batch

    rng = np.random.default_rng(seed)
    images, categories, labels, masks = [], [], [], []
    for category, rows in manifest[manifest.split == "val"].groupby("category", sort=True):
        normals = list(load_batch(rows.path.tolist(), size).numpy())
        defective = [
            synthetic_defect(img, normals[(i + 1) % len(normals)], kind, rng)
            for i, img in enumerate(normals)
            for kind in DEFECTS
        ]
        images += normals + [image for image, _ in defective]
        masks += [np.zeros((size, size), dtype=bool)] * len(normals) + [mask for _, mask in defective]
        categories += [category] * (len(normals) + len(defective))
        labels += [0] * len(normals) + [1] * len(defective)
    return images, np.array(categories), np.array(labels), np.stack(masks)


def log_p_maps(model, feature_batches) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-scale log p maps (3 tensors (N, h, w)), the total log-likelihood (N,) and the pooled stride-32 features
    (N, C) of the feature batches."""
    maps, totals, pooled = [], [], []
    with torch.inference_mode():
        for features in feature_batches:
            zs, logdet, proto_q, _ = model.encode(features)
            maps.append(model.log_p_maps(zs, proto_q))
            totals.append(model.log_likelihood(zs, logdet, proto_q))
            pooled.append(features[3].float().mean((2, 3)))
    return [torch.cat([m[level] for m in maps]) for level in range(3)], torch.cat(totals), torch.cat(pooled)


def cached(cache, ids: list[str]):
    for start in range(0, len(ids), 16):
        yield cache.get(ids[start : start + 16])


def extracted(backbone, images: list[np.ndarray]):
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            yield [f.float() for f in backbone(torch.from_numpy(np.stack(images[start : start + 16])))]


SIGMA = 4.0  # the Gaussian smoothing of PaDiM, PatchCore and ViTAD (pixels at 256 px)


def z_sum(maps, train_maps, size: int, per_position: bool) -> torch.Tensor:
    """sum_l upsample((-log p_l - mean_l) / std_l), training statistics per position or per scale."""
    from vqflow.models.anomaly_map import floored_std, upsample

    total = 0
    for m, train in zip(maps, train_maps):
        nll = -train.double()
        mean, std = (nll.mean(0), nll.std(0, correction=0)) if per_position else (nll.mean(), nll.std(correction=0))
        total = total + upsample(((-m.double() - mean) / floored_std(std)).float(), size)
    return total


def train_relative_map(maps, train_maps, size: int) -> torch.Tensor:
    """c_train - sum_l log p_l, c_train = the largest sum_l log p_l of a training pixel."""
    from vqflow.models.anomaly_map import log_map, upsample

    return log_map(maps, size, sum(upsample(m, size) for m in train_maps).amax())


def base_maps(maps, train_maps, size: int) -> dict[str, torch.Tensor]:
    """The maps that both image score and anomaly map candidates build on, computed once per image set: the
    c_train map, the add map and the per-position z map."""
    from vqflow.models.anomaly_map import add_map

    references = [m.amax() for m in train_maps]
    return {
        "train_relative": train_relative_map(maps, train_maps, size),
        # by the number of (finest) scales in it: without the stride-32 scale, whose 8 x 8 map is blown up 32 x to
        # the image, the finer scales localise
        "added": {n: add_map(maps[:n], size, references[:n]) for n in (3, 2)},
        "position": z_sum(maps, train_maps, size, True),
    }


def rule_scores(
    maps, log_likelihood, pooled, train_maps, train_pooled, size: int, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every candidate image score of the images whose maps are ``maps`` (``base``: their base_maps); references
    from ``train_maps`` (and the global Gaussian from ``train_pooled``)."""
    from vqflow.models.anomaly_map import gaussian_smooth, log_map, top_k_score
    from vqflow.models.global_density import PooledGaussian

    train_relative, added, position = base["train_relative"], base["added"][3], base["position"]
    image_relative, per_scale = log_map(maps, size), z_sum(maps, train_maps, size, False)
    smoothed, smoothed_position = gaussian_smooth(train_relative, SIGMA), gaussian_smooth(position, SIGMA)
    density = PooledGaussian(train_pooled.shape[1])
    density.fit(train_pooled)
    global_nll = -density.log_density(pooled)
    return {
        TRAIN_RULE: top_k_score(train_relative, 0.03),
        "top 1 % of c_train - sum_l log p_l": top_k_score(train_relative, 0.01),
        "top 0.1 % of c_train - sum_l log p_l (about one stride-8 cell)": top_k_score(train_relative, 0.001),
        "max of c_train - sum_l log p_l": train_relative.flatten(1).amax(1),
        f"top 3 % of c_train - sum_l log p_l, Gaussian-smoothed (sigma {SIGMA:g})": top_k_score(smoothed, 0.03),
        f"top 1 % of the smoothed c_train - sum_l log p_l (sigma {SIGMA:g})": top_k_score(smoothed, 0.01),
        f"max of the smoothed c_train - sum_l log p_l (sigma {SIGMA:g}, PaDiM's rule)": smoothed.flatten(1).amax(1),
        IMAGE_RULE: top_k_score(image_relative, 0.03),
        "top 3 % of the add map (training references)": top_k_score(added, 0.03),
        "max of the add map (training references)": added.flatten(1).amax(1),
        "- total log-likelihood (log p(x) with log-det)": -log_likelihood,
        POSITION_RULE: top_k_score(position, 0.03),
        "top 1 % of sum_l z_l (per position)": top_k_score(position, 0.01),
        "max of sum_l z_l (per position)": position.flatten(1).amax(1),
        f"max of the smoothed sum_l z_l (per position, sigma {SIGMA:g})": smoothed_position.flatten(1).amax(1),
        "top 3 % of sum_l z_l, standardised per scale (one mean and std per scale)": top_k_score(per_scale, 0.03),
        # a constant per image: top-k(map + g) = top-k(map) + g; c_train only shifts every score alike
        GLOBAL_RULE.format(weight=1): top_k_score(train_relative, 0.03) + global_nll,
        GLOBAL_RULE.format(weight=3): top_k_score(train_relative, 0.03) + 3 * global_nll,
        "the global term alone: -log p of the pooled stride-32 feature": global_nll,
    }


PIXEL_METRICS = (("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_f1max", "P-F1max"), ("pixel_aupro", "AUPRO"))
ADD_MAPS = ((3, 0.0), (3, 2.0), (3, SIGMA), (3, 8.0), (2, 0.0), (2, SIGMA))  # (map_scales, map_sigma) candidates


def add_map_name(scales: int, sigma: float) -> str:
    """The candidate name of the add map of the finest ``scales`` scales smoothed at ``sigma`` (model.vqflow's
    map_scales / map_sigma)."""
    if scales == 3:
        name = "add map" + (": L - sum_l exp(log p_l - c_l) (MSFlow's, training references)" if not sigma else "")
    else:
        name = "add map of the stride-8 and stride-16 scales" + ("" if sigma else " only")
    return name + (f", Gaussian-smoothed (sigma {sigma:g})" if sigma else "")


def pixel_rule_maps(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every candidate anomaly map (N, size, size) of the images whose base_maps are ``base``."""
    from vqflow.models.anomaly_map import gaussian_smooth

    train_relative = base["train_relative"]
    added = {
        add_map_name(n, sigma): gaussian_smooth(base["added"][n], sigma) if sigma else base["added"][n]
        for n, sigma in ADD_MAPS
    }
    return {
        **added,
        "c_train - sum_l log p_l (the image score's map)": train_relative,
        f"c_train - sum_l log p_l, Gaussian-smoothed (sigma {SIGMA:g})": gaussian_smooth(train_relative, SIGMA),
        f"sum_l z_l (per position), Gaussian-smoothed (sigma {SIGMA:g})": gaussian_smooth(base["position"], SIGMA),
    }


def pixel_results(candidates: dict[str, torch.Tensor], categories: np.ndarray, masks: np.ndarray) -> dict:
    """Per candidate map: pixel AUROC, AP, F1-max and AUPRO per category and their means (the pixel part of mAD)."""
    from vqflow.metrics import pixel_metrics

    results = {}
    for name, candidate in candidates.items():
        per_category = {
            c: pixel_metrics(candidate.numpy()[categories == c], masks[categories == c])
            for c in sorted(set(categories))
        }
        mean = {key: float(np.mean([m[key] for m in per_category.values()])) for key, _ in PIXEL_METRICS}
        results[name] = {"per_category": per_category, "mean": mean, "pixel_mad": float(np.mean(list(mean.values())))}
    return results


def per_category_auroc(scores: torch.Tensor, categories: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from vqflow.metrics import auroc

    return {c: auroc(labels[categories == c], scores.numpy()[categories == c]) for c in sorted(set(categories))}


def score_table(suite: str, params: dict, model_dir: Path, source: str) -> tuple[dict, dict, str, str]:
    """(image score results per rule, pixel results per map, markdown tables, source) of the model in
    ``model_dir``: validation with synthetic defects, and (image scores) the test split."""
    from vqflow.stages.common import manifest_and_cache
    from vqflow.stages.evaluate import ground_truth_masks
    from vqflow.bundle import ModelBundle

    manifest, cache = manifest_and_cache(params)
    bundle = ModelBundle(model_dir)
    model, backbone = bundle.load_model("cpu").eval(), bundle.load_backbone("cpu").eval()
    size = model.config.image_size
    strides = [size // side for side in model.config.scale_sizes]
    if strides != [8, 16, 32]:  # the candidates' names (add_map_name, "stride-32", "stride-8 cell") say so
        raise SystemExit(f"{model_dir}: flow scale strides {strides}; this table's candidate names assume 8, 16, 32")
    train_maps, _, train_pooled = log_p_maps(
        model, cached(cache, manifest[manifest.split == "train"].image_id.tolist())
    )
    val_images, val_categories, val_labels, val_masks = validation_images(manifest, size)
    val_maps, val_log_likelihood, val_pooled = log_p_maps(model, extracted(backbone, val_images))
    val_base = base_maps(val_maps, train_maps, size)
    val = rule_scores(val_maps, val_log_likelihood, val_pooled, train_maps, train_pooled, size, val_base)
    pixel = pixel_results(pixel_rule_maps(val_base), val_categories, val_masks)
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    test_outputs = log_p_maps(model, cached(cache, test.image_id.tolist()))  # (maps, log-likelihood, pooled)
    test_base = base_maps(test_outputs[0], train_maps, size)
    scored = rule_scores(*test_outputs, train_maps, train_pooled, size, test_base)
    test_masks = ground_truth_masks(test, size)
    for name, result in pixel_results(pixel_rule_maps(test_base), test.category.to_numpy(), test_masks).items():
        pixel[name]["test"] = result  # reported after the choice, like the image scores' test columns
    names = sorted(set(test.category))
    results = {}
    for rule in scored:
        on_val = per_category_auroc(val[rule], val_categories, val_labels)
        on_test = per_category_auroc(scored[rule], test.category.to_numpy(), test.label.to_numpy())
        results[rule] = {
            "validation": {"per_category": on_val, "mean": float(np.mean(list(on_val.values())))},
            "test": {"per_category": on_test, "mean": float(np.mean(list(on_test.values())))},
        }
    lines = [
        "| image score rule | validation + synthetic defects | "
        + " | ".join(f"test: {n}" for n in names)
        + " | test mean |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    for rule, r in results.items():
        mark = " (**chosen**)" if rule == chosen_rule(params) else ""
        cells = [f"{100 * r['validation']['mean']:.1f}"] + [f"{100 * r['test']['per_category'][n]:.1f}" for n in names]
        lines.append(f"| {rule}{mark} | " + " | ".join(cells) + f" | {100 * r['test']['mean']:.1f} |")
    counts = {c: int((val_categories == c).sum()) for c in sorted(set(val_categories))}
    note = (
        f"\n\nImage AUROC of {source} ({suite} suite) under each rule, same model and maps. Validation: each "
        f"category's held-out normals and one copy of each per synthetic defect kind ({', '.join(DEFECTS)}); mean "
        f"over categories ({', '.join(f'{c} {n}' for c, n in counts.items())} images). z_l statistics and c_train "
        "are fitted on the training images; log p_l = per-scale map, upsampled."
    )
    labels = [label for _, label in PIXEL_METRICS]
    pixel_lines = [
        "| anomaly map | "
        + " | ".join(labels)
        + " | mean | "
        + " | ".join(f"test: {x}" for x in labels)
        + " | test mean |",
        "|---|" + "---:|" * (2 * len(PIXEL_METRICS) + 2),
    ]
    for name, r in pixel.items():
        cells = [
            f"{100 * value:.1f}"
            for part in (r, r["test"])
            for value in [*(part["mean"][key] for key, _ in PIXEL_METRICS), part["pixel_mad"]]
        ]
        pixel_lines.append(
            f"| {name}{' (**ours**)' if name == chosen_map(params) else ''} | " + " | ".join(cells) + " |"
        )
    pixel_note = (
        "\n\nPixel metrics of the same model's anomaly maps on the same validation images (synthetic defect masks: "
        "the pasted rectangle, or where a spot or scratch changes the image by at least half its amount; normal "
        "images count as all-normal pixels), mean over categories; mean = the pixel part of mAD. test: the same "
        "maps of the suite's test split against its ground-truth masks, reported after the choice."
    )
    tables = "\n".join(lines) + note + "\n\n" + "\n".join(pixel_lines) + pixel_note
    return results, pixel, tables, source


def chosen_rule(params: dict) -> str:
    """The rule the model's params select (top-k 3 %)."""
    rules = {"position": POSITION_RULE, "train": TRAIN_RULE, "image": IMAGE_RULE}
    return rules[params["model"]["vqflow"].get("normalization", VQFlowConfig().normalization)]


def chosen_map(params: dict) -> str:
    """The anomaly map the model's params select (model.vqflow map_scales / map_sigma)."""
    defaults, section = VQFlowConfig(), params["model"]["vqflow"]
    setting = (section.get("map_scales", defaults.map_scales), float(section.get("map_sigma", defaults.map_sigma)))
    if setting not in ADD_MAPS:
        raise SystemExit(f"params.yaml model.vqflow map_scales / map_sigma {setting}: not a candidate here {ADD_MAPS}")
    return add_map_name(*setting)


MARGIN = 0.005  # the decision rule, written down before any figure: see decision_table


def decides(values: list[float], ours: list[float]) -> tuple[float, bool]:
    """(mean gain over the two suites, whether it replaces ours): the gain exceeds MARGIN and neither suite loses
    more than MARGIN."""
    gain = (values[0] + values[1] - ours[0] - ours[1]) / 2
    return gain, gain > MARGIN and min(v - o for v, o in zip(values, ours)) >= -MARGIN


def validation_auroc(result: dict) -> float:
    return result["validation"]["mean"]


def pixel_mean(result: dict) -> float:
    return result["pixel_mad"]


def decision_table(header: str, suites: tuple[dict, dict], value: Callable[[dict], float], ours: str) -> str:
    """The rule that decides the default, written down before any figure: a candidate (``header``: image score rule
    or anomaly map) replaces ``ours`` only if its validation ``value`` averaged over the default and the real suite
    (``suites``: candidate -> results) beats ours by more than 0.5 points without losing more than 0.5 on either."""
    reference = [value(suite[ours]) for suite in suites]
    lines = [
        f"| {header} | validation: default | validation: real | mean | vs ours | replaces ours |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in suites[0]:
        values = [value(suite[name]) for suite in suites]
        gain, wins = decides(values, reference)
        wins = wins and name != ours
        cells = [f"{100 * v:.1f}" for v in values] + [f"{50 * sum(values):.1f}", f"{100 * gain:+.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'**yes**' if wins else 'no'} |")
    return "\n".join(lines)


def write_table(suite: str, results: dict, pixel: dict, table: str, source: str) -> None:
    payload = {"suite": suite, "model": source, "rules": results, "pixel_maps": pixel}
    print(publish(f"score_rules_{suite}", payload, table, f"score_rules:{suite}"))
    suites = {name: RESULTS / f"score_rules_{name}.json" for name in ("default", "real")}
    if not all(path.is_file() for path in suites.values()):
        return
    default, real = (read_json(path) for path in suites.values())
    # both suites must have every candidate (else: the other suite is not re-run yet)
    if set(default["rules"]) != set(real["rules"]) or set(default.get("pixel_maps", {})) != set(real["pixel_maps"]):
        return
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the rule and map the product runs today
    image = decision_table("image score rule", (default["rules"], real["rules"]), validation_auroc, chosen_rule(params))
    pixel = decision_table("anomaly map", (default["pixel_maps"], real["pixel_maps"]), pixel_mean, chosen_map(params))
    tables = image + (
        "\n\nImage score: validation image AUROC (mean over categories).\n\n"
        + pixel
        + "\n\nAnomaly map: validation mean of pixel AUROC, AP, F1-max and AUPRO (mean over categories)."
    )
    note = (
        "\n\nFrom bench/results/score_rules_default.json and score_rules_real.json (validation columns only; "
        "the test split never enters the decision)."
    )
    publish("score_rules_decision", {"margin": MARGIN}, tables + note, "score_rules:decision")


def ablation_run(suite: str, variant: str) -> tuple[dict, Path]:
    """(params, model dir) of a trained row of bench/ablation.py (its work dir, the same params it trained with)."""
    from bench.ablation import VARIANTS, ablation_base, variant_params
    from vqflow import stages

    if variant not in VARIANTS:
        raise SystemExit(f"--ablation-variant {variant!r}: not a row of bench/ablation.py ({list(VARIANTS)})")
    base, work = ablation_base(suite, str(ROOT.parent / "shared"))
    params = variant_params(base, work, variant)
    model_dir = Path(params["outputs"]["model"])
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: not trained yet (python bench/ablation.py --suite {suite} --variants ...)")
    stages.run("features", params)  # the cache in the current layout (extracts only what is missing)
    return params, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="default", choices=["default", "real"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--experiment",
        help="the DVC experiment whose trained model is scored (`dvc exp apply` into the workspace, restored to "
        "HEAD afterwards), e.g. default-vqflow from bench/experiments.py",
    )
    source.add_argument(
        "--ablation-variant",
        help="a trained row of bench/ablation.py for the suite, e.g. '+CPC+CADM+CSPC = vqflow' (its work dir)",
    )
    source.add_argument(
        "--workspace", action="store_true", help="the model `make run` trained with params.yaml (default suite)"
    )
    args = parser.parse_args()
    if args.workspace:
        if args.suite != "default":
            raise SystemExit("--workspace is the default suite's model (params.yaml); use --suite default")
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        write_table(
            args.suite, *score_table(args.suite, params, Path(params["outputs"]["model"]), "the workspace model")
        )
        return
    if args.ablation_variant:
        params, model_dir = ablation_run(args.suite, args.ablation_variant)
        write_table(args.suite, *score_table(args.suite, params, model_dir, f"ablation row {args.ablation_variant!r}"))
        return
    # `dvc exp apply` rewrites tracked files with the experiment's versions (its commit holds the whole work tree
    # of its run): only on a clean work tree, restored to HEAD afterwards. The files this script writes itself
    # (README, its results) may differ from HEAD: they are kept aside and put back.
    own = [ROOT / "README.md", *sorted(RESULTS.glob("score_rules_*"))]
    own_names = {str(p.relative_to(ROOT)) for p in own}
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.splitlines()
    dirty = [line for line in status if line[3:] not in own_names]
    if dirty:
        raise SystemExit("--experiment needs a clean work tree (commit or stash first):\n" + "\n".join(dirty))
    kept = {path: path.read_bytes() for path in own}
    subprocess.run(["dvc", "exp", "apply", args.experiment], cwd=ROOT, check=True)
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        table = score_table(args.suite, params, Path(params["outputs"]["model"]), f"experiment {args.experiment}")
    finally:
        restore_committed(["."])
        for path, data in kept.items():
            path.write_bytes(data)
    write_table(args.suite, *table)


if __name__ == "__main__":
    main()
