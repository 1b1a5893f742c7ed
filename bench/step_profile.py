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

from bench.common import cpu_flags, write_results  # noqa: E402
from bench.training_step import training_step  # noqa: E402
from vqflow.config import load_params  # noqa: E402


def cpu_mhz() -> float:
    """The clock /proc/cpuinfo reports (nan if unknown)."""
    try:
        return next(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return float("nan")


def conv_gflops(shapes: list) -> float:
    """GFLOP of one stride-1, 'same'-padded convolution from its profiled (input, weight) shapes (0: unknown)."""
    if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
        return 0.0
    (n, _, h, w), (out, per_group, kh, kw) = shapes[0], shapes[1]
    return 2 * n * h * w * out * per_group * kh * kw / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    name = params["model"]["name"]
    batch_size = params["train"]["batch_size"]
    image_size = params["features"]["image_size"]
    step = training_step(params, {})

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
            "gflops": conv_gflops(e.input_shapes),
        }
        for e in convolutions[: args.top]
    ]
    rates = [1000 * c["gflops"] * c["calls_per_step"] / c["forward_ms_per_step"] for c in by_shape if c["gflops"]]
    flops_ms = sum(c["gflops"] * c["calls_per_step"] for c in by_shape if c["gflops"])
    shape_ms = sum(c["forward_ms_per_step"] for c in by_shape if c["gflops"])
    lines = [
        f"VQ-Flow training step ({name}, batch {batch_size}, {image_size} px, float32, kernels pinned "
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
        "The forward convolutions by shape (their backward costs about twice as much), with the rate they reach "
        "(multiply-adds counted as 2 floating-point operations, stride 1, 'same' padding: the flows' subnets). "
        f"Together {1000 * flops_ms / shape_ms:.0f} GFLOP/s over these shapes ({min(rates):.0f}-{max(rates):.0f} "
        f"per shape). A core with AVX2 does at most 2 FMA x 8 floats x 2 = 32 float operations per cycle, so "
        f"{1000 * flops_ms / shape_ms:.0f} GFLOP/s on {torch.get_num_threads()} threads is that peak at "
        f"{1000 * flops_ms / shape_ms / 32 / torch.get_num_threads():.1f} GHz (/proc/cpuinfo reports "
        f"{cpu_mhz() / 1000:.1f} GHz, the base clock of a VM's cores): the convolutions leave an implementation "
        "little to gain, only fewer multiply-adds would make them faster.",
        "",
        "| input (N, C, H, W) | weight (out, in, kh, kw) | calls / step | forward ms / step | GFLOP/s |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {c['input']} | {c['weight']} | {c['calls_per_step']:.0f} | {c['forward_ms_per_step']:.1f} | "
            f"{1000 * c['gflops'] * c['calls_per_step'] / c['forward_ms_per_step']:.0f} |"
            for c in by_shape
        ),
    ]
    table = "\n".join(lines)
    write_results(
        "step_profile",
        {
            "model": name,
            "batch_size": batch_size,
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
