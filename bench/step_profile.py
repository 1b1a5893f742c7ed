"""Where a VQ-Flow training step spends its time on CPU: torch.profiler over optimiser steps of the default model
on the default data's cached features, float32, the kernels pinned to AVX2 as the train stage pins them.

    python -m bench.step_profile              # params.yaml's model, 16-image batches; writes bench/results/step_profile.*

Needs `dvc repro features` first (the feature cache). Reports ms per step (forward + backward + Adam), the CPU
flags, and the ops with the largest self CPU time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from vqflow.cli import REPRODUCIBLE_KERNELS

if platform.machine().lower() in ("x86_64", "amd64"):  # before torch is imported, as `vqflow train` does
    for key, value in REPRODUCIBLE_KERNELS.items():
        os.environ.setdefault(key, value)

import torch  # noqa: E402

from bench.common import write_results  # noqa: E402
from vqflow.config import load_params, section  # noqa: E402


def cpu_flags() -> list[str]:
    """The CPU's vector-extension flags that decide kernel speed (AVX2, AVX-512, VNNI, AMX)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)

    from vqflow.features import CachedFeatures
    from vqflow.models import config_from_params, create_model
    from vqflow.stages.common import channels, manifest_and_cache
    from vqflow.train import TrainConfig, seed_everything

    params = load_params(args.params)
    manifest, cache = manifest_and_cache(params)
    name, config = config_from_params(
        section(params, "model", ("name",)), in_channels=channels(cache), image_size=cache.spec.image_size
    )
    train = {k: v for k, v in section(params, "train").items() if k != "loader_workers"}
    cfg = TrainConfig.from_params(train, name)
    seed_everything(cfg.seed)
    model = create_model(name, config)
    ids = manifest.loc[manifest.split == "train", "image_id"].tolist()
    features = CachedFeatures(cache, ids)
    model.initialize(features.__getitems__(list(range(min(cfg.init_images, len(ids))))))
    optimizer = cfg.make_optimizer([p for p in model.parameters() if p.requires_grad])
    batch = features.__getitems__(list(range(cfg.batch_size)))
    model.train()

    def step() -> None:
        for chunk in model.training_chunks(batch):
            out = model.training_step(chunk)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms_per_step = 1000 * (time.perf_counter() - started) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        for _ in range(args.steps):
            step()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [
        {
            "op": e.key,
            "calls_per_step": e.count / args.steps,
            "self_ms_per_step": e.self_cpu_time_total / 1000 / args.steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[: args.top]
    ]
    convolutions = sorted(
        (e for e in profiler.key_averages(group_by_input_shape=True) if e.key == "aten::mkldnn_convolution"),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    by_shape = [
        {
            "input": str(e.input_shapes[0]) if e.input_shapes else "?",
            "weight": str(e.input_shapes[1]) if len(e.input_shapes) > 1 else "?",
            "calls_per_step": e.count / args.steps,
            "forward_ms_per_step": e.self_cpu_time_total / 1000 / args.steps,
        }
        for e in convolutions[: args.top]
    ]
    lines = [
        f"VQ-Flow training step ({name}, batch {cfg.batch_size}, {cache.spec.image_size} px, float32, kernels pinned "
        f"to AVX2; CPU flags: {' '.join(cpu_flags()) or 'unknown'}): **{ms_per_step:.0f} ms per step** "
        f"(forward + backward + clip + Adam, mean of {args.steps} after {args.warmup} warm-up steps).",
        "",
        "| op | calls / step | self ms / step | share of self CPU time |",
        "|---|---:|---:|---:|",
        *(
            f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['self_ms_per_step']:.1f} | {100 * o['share']:.1f} % |"
            for o in ops
        ),
        "",
        "The forward convolutions by shape (their backward costs about twice as much):",
        "",
        "| input (N, C, H, W) | weight (out, in, kh, kw) | calls / step | forward ms / step |",
        "|---|---|---:|---:|",
        *(
            f"| {c['input']} | {c['weight']} | {c['calls_per_step']:.0f} | {c['forward_ms_per_step']:.1f} |"
            for c in by_shape
        ),
    ]
    table = "\n".join(lines)
    write_results(
        "step_profile",
        {
            "model": name,
            "batch_size": cfg.batch_size,
            "ms_per_step": ms_per_step,
            "cpu_flags": cpu_flags(),
            "ops": ops,
            "convolutions": by_shape,
        },
        table,
    )
    print(table)


if __name__ == "__main__":
    main()
