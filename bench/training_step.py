"""Training-step time of the default VQ-Flow and of each variant tried to make it faster, measured in one run.

    python -m bench.training_step                       # time every try in TRIES; writes bench/results/training_step.*
    python -m bench.training_step --train default real --tries 5   # train try 5 on both suites, score it, then time

Timing needs `dvc repro features` first (the feature cache). float32, the kernels pinned to AVX2 as the train stage
pins them (on an AVX-512 machine too: plan for the line PCs and CI machines that have only AVX2). The tries run in
turns (one step of each, repeated), so a change in the machine's load falls on all of them alike.

``--train``: a try is trained with the suite's own recipe (bench/experiments.py's suite settings) through the
pipeline's stages in bench/.work/training_step/<suite>/ and scored by bench/score_rules.py on the validation images
with synthetic defects (no test image decides): the image AUROC of the chosen rule and the pixel mean of the chosen
map go to bench/results/training_step_validation.json, which the table reads. Today's model (try 0) is scored
where it already is: `make run`'s workspace model (default) and the real suite's figures in
bench/results/score_rules_real.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vqflow.cli import REPRODUCIBLE_KERNELS

if platform.machine().lower() in ("x86_64", "amd64"):  # before torch is imported, as `vqflow train` does
    for key, value in REPRODUCIBLE_KERNELS.items():
        os.environ.setdefault(key, value)

import torch  # noqa: E402

from bench.common import RESULTS, cpu_flags, write_results  # noqa: E402
from vqflow.io import read_json, write_json  # noqa: E402
from vqflow.config import load_params, section  # noqa: E402

# today's default (before this table): every try starts from it and names what it changes
TODAY_MODEL = {"flow_blocks": [2, 5, 8], "flow_kernels": [3, 3, 3], "fusion_kernel": 3, "separable": False}
TODAY_TRAIN = {"epochs": 40, "lr": 0.0002, "schedule": "step", "lr_decay_epochs": [32]}


@dataclass(frozen=True)
class Try:
    name: str
    model: dict = field(default_factory=dict)  # over TODAY_MODEL (model.vqflow)
    train: dict = field(default_factory=dict)  # over TODAY_TRAIN (train.per_model.vqflow): no change to a step
    step: dict = field(default_factory=dict)  # training_step options: channels_last, compile


TRIES: list[Try] = [
    Try("today: 3 x 3 subnets everywhere"),
    Try("1 x 1 at the coarsest scale", {"flow_kernels": [3, 3, 1]}),
    Try("1 x 1 at the coarsest scale and in the fusion", {"flow_kernels": [3, 3, 1], "fusion_kernel": 1}),
    Try(
        "3 x 3 / 1 x 1 alternating at stride 16, 1 x 1 at 32 and fusion",
        {"flow_kernels": [3, [3, 1], 1], "fusion_kernel": 1},
    ),
    Try(
        "3 x 3 / 1 x 1 alternating at strides 8 and 16, 1 x 1 at 32 and fusion",
        {"flow_kernels": [[3, 1], [3, 1], 1], "fusion_kernel": 1},
    ),
    Try("3 x 3 at stride 8 only", {"flow_kernels": [3, 1, 1], "fusion_kernel": 1}),
    Try("1 x 1 everywhere", {"flow_kernels": [1, 1, 1], "fusion_kernel": 1}),
    Try("fewer blocks: [2, 4, 4]", {"flow_blocks": [2, 4, 4]}),
    Try("depthwise-separable 3 x 3 subnets", {"separable": True}),
    Try(
        "one cycle: warm-up, cosine from 2x the lr, half the epochs",
        train={"epochs": 20, "lr": 0.0004, "schedule": "cosine", "lr_decay_epochs": []},
    ),
    Try("channels-last (oneDNN)", step={"channels_last": True}),
    Try("torch.compile (inductor)", step={"compile": True}),
]

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = RESULTS / "training_step_validation.json"


def training_step(params: dict, overrides: dict, channels_last: bool = False, compile: bool = False) -> Callable:
    """One optimiser step (forward, backward, clip, Adam) of params.yaml's model with ``overrides`` on its section,
    on one cached batch of training features, as the train stage takes it; ``channels_last``: the model and the
    batch in that memory format; ``compile``: the training step through torch.compile."""
    from vqflow.features import CachedFeatures
    from vqflow.models import config_from_params, create_model
    from vqflow.stages.common import channels, manifest_and_cache
    from vqflow.train import TrainConfig, seed_everything

    params = copy.deepcopy(params)
    model_params = section(params, "model", ("name",))
    model_params[model_params["name"]].update(overrides)
    manifest, cache = manifest_and_cache(params)
    name, config = config_from_params(model_params, in_channels=channels(cache), image_size=cache.spec.image_size)
    train = {k: v for k, v in section(params, "train").items() if k != "loader_workers"}
    cfg = TrainConfig.from_params(train, name)
    seed_everything(cfg.seed)
    model = create_model(name, config)
    ids = manifest.loc[manifest.split == "train", "image_id"].tolist()
    features = CachedFeatures(cache, ids)
    model.initialize(features.__getitems__(list(range(min(cfg.init_images, len(ids))))))
    optimizer = cfg.make_optimizer([p for p in model.parameters() if p.requires_grad])
    batch = features.__getitems__(list(range(cfg.batch_size)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = [f.contiguous(memory_format=torch.channels_last) if f.dim() == 4 else f for f in batch]
    model.train()
    forward = torch.compile(model.training_step) if compile else model.training_step
    trained = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> None:
        for chunk in model.training_chunks(batch):
            out = forward(chunk)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()

    return step


def validation_figures(suite: str, params: dict, model_dir: Path, source: str) -> dict:
    """bench/score_rules.py's validation figures of a trained model: chosen rule's image AUROC, chosen map's pixel
    mean (percent)."""
    from bench.score_rules import chosen_map, chosen_rule, score_table

    rules, maps, _, _ = score_table(suite, params, model_dir, source)
    return {
        "image_auroc": 100 * rules[chosen_rule(params)]["validation"]["mean"],
        "pixel_mean": 100 * maps[chosen_map(params)]["pixel_mad"],
        "source": source,
    }


def today_figures(suite: str) -> dict | None:
    """Today's model's validation figures where it already is: `make run`'s workspace model while params.yaml
    still is today's default, the committed real-suite experiment's; None: train it like any try."""
    from bench.score_rules import chosen_map, chosen_rule

    params = load_params(ROOT / "params.yaml")
    if suite == "default":
        section, recipe = params["model"]["vqflow"], params["train"]["per_model"]["vqflow"]
        if any(section.get(k, v) != v for k, v in TODAY_MODEL.items()) or any(
            recipe.get(k, params["train"].get(k)) != v for k, v in TODAY_TRAIN.items()
        ):
            return None
        return validation_figures(suite, params, ROOT / params["outputs"]["model"], "`make run`'s workspace model")
    recorded = read_json(RESULTS / f"score_rules_{suite}.json")
    return {
        "image_auroc": 100 * recorded["rules"][chosen_rule(params)]["validation"]["mean"],
        "pixel_mean": 100 * recorded["pixel_maps"][chosen_map(params)]["pixel_mad"],
        "source": f"bench/results/score_rules_{suite}.json ({recorded['model']}, commit {recorded['machine']['commit']})",
    }


def train_try(suite: str, shared: str, attempt: Try) -> dict:
    """Train one try with the suite's recipe (today's model and budget, then the try's changes) through the
    pipeline's stages; its validation figures."""
    from bench.experiments import suite_params
    from vqflow import stages, timing

    work = ROOT / "bench/.work/training_step" / suite
    params = suite_params(load_params(ROOT / "params.yaml"), suite, shared)
    params["generate"]["root"] = str(work / "synthetic")
    if suite == "default":
        params["prepare"]["sources"] = [{"kind": "mvtec", "root": str(work / "synthetic"), "categories": []}]
    params["prepare"]["manifest"] = str(work / "manifest.csv")
    params["features"]["cache"] = str(work / "features")
    out = work / "runs" / re.sub(r"[^A-Za-z0-9]+", "_", attempt.name).strip("_")
    params["outputs"] = {
        **params["outputs"],
        **{
            key: str(out / key)
            for key in ("weights", "model", "train_log", "timing", "metrics", "scores", "plots", "curves", "report")
        },
        "thresholds": str(out / "thresholds.json"),
        "checkpoints": str(work / "checkpoints"),
    }
    params["model"]["vqflow"].update({**TODAY_MODEL, **attempt.model})
    recipe = params["train"]["per_model"]["vqflow"]
    if suite == "default":  # the real suite's recipe has its own budget (bench/experiments.py)
        recipe.update(TODAY_TRAIN)
    recipe.update(attempt.train)
    if suite == "default":
        stages.run("generate", params)
    stages.run("prepare", params)
    stages.run("features", params)
    started = time.perf_counter()
    stages.run_all(params, stages.MODEL)
    figures = validation_figures(suite, params, Path(params["outputs"]["model"]), f"try {attempt.name!r}")
    return {
        **figures,
        "train_seconds": timing.read(params)["train"]["training_seconds"],
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tries", nargs="*", type=int, help="indices into TRIES (default: all)")
    parser.add_argument("--train", nargs="*", default=[], choices=["default", "real"], help="suites to train on")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    chosen = [TRIES[i] for i in (args.tries if args.tries else range(len(TRIES)))]
    validation = read_json(VALIDATION) if VALIDATION.exists() else {}
    for suite in args.train:
        for attempt in chosen:
            if attempt.step:
                continue  # a step option (channels-last, compile) does not change what is trained
            print(f"== {suite}: {attempt.name}", flush=True)
            figures = (today_figures(suite) if attempt == TRIES[0] else None) or train_try(suite, args.shared, attempt)
            validation.setdefault(attempt.name, {})[suite] = figures
            write_json(VALIDATION, validation)
            print(
                f"   validation image AUROC {figures['image_auroc']:.1f}, pixel mean {figures['pixel_mean']:.1f}",
                flush=True,
            )
    steps, setup = {}, {}
    for attempt in chosen:
        started = time.perf_counter()
        try:
            steps[attempt.name] = training_step(params, {**TODAY_MODEL, **attempt.model}, **attempt.step)
            for _ in range(args.warmup):
                steps[attempt.name]()
        except Exception as error:  # a try that does not run is a result too
            steps.pop(attempt.name, None)
            setup[attempt.name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        setup[attempt.name] = f"{time.perf_counter() - started:.0f} s"
        print(f"{attempt.name}: set up + {args.warmup} warm-up steps in {setup[attempt.name]}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(1000 * (time.perf_counter() - started))
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
    baseline = statistics.median(times[TRIES[0].name]) if TRIES[0].name in times else float("nan")
    rows = []
    for attempt in chosen:
        ms = statistics.median(times[attempt.name]) if attempt.name in times else float("nan")
        rows.append(
            {
                "try": attempt.name,
                "model": attempt.model,
                "train": attempt.train,
                "step": attempt.step,
                "ms_per_step": ms,
                "speedup": baseline / ms,
                "setup": setup[attempt.name],
                "validation": validation.get(attempt.name, {}),
            }
        )

    def figures(row: dict, suite: str) -> str:
        value = row["validation"].get(suite)
        if not value:
            return "not trained"
        seconds = f", {value['train_seconds']:.0f} s" if "train_seconds" in value else ""
        return f"{value['image_auroc']:.1f} / {value['pixel_mean']:.1f}{seconds}"

    def changes(row: dict) -> str:
        parts = [
            f"model {row['model']}" if row["model"] else "",
            f"train {row['train']}" if row["train"] else "",
            f"step {row['step']}" if row["step"] else "",
        ]
        return "`" + "; ".join(p for p in parts if p) + "`" if any(parts) else "-"

    lines = [
        f"VQ-Flow training step (batch 16, 256 px, float32, kernels pinned to AVX2; CPU flags: "
        f"{' '.join(cpu_flags()) or 'unknown'}): median of {args.rounds} steps of each try, taken in turns after "
        f"{args.warmup} warm-up steps. Each try changes today's default ({TODAY_MODEL}, train {TODAY_TRAIN}) as its "
        "row says. Validation: bench/score_rules.py's image AUROC of the chosen rule / pixel mean of the chosen map "
        "on the validation images with synthetic defects (and the training seconds of that run).",
        "",
        "| try | changes | ms / step | speed-up | set-up | validation: default | validation: real |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['try']} | {changes(r)} | "
            f"{r['ms_per_step']:.0f} | {r['speedup']:.2f}x | {r['setup']} | {figures(r, 'default')} | "
            f"{figures(r, 'real')} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines)
    write_results("training_step", {"rounds": args.rounds, "cpu_flags": cpu_flags(), "tries": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
