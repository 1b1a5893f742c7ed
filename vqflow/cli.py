"""The `vqflow` command: one subcommand per pipeline stage, each reading its params.yaml sections."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .config import ParamsError, load_params, section

STAGES: dict[str, Callable[[dict, argparse.Namespace], None]] = {}


def stage(name: str):
    def register(fn: Callable[[dict, argparse.Namespace], None]):
        STAGES[name] = fn
        return fn

    return register


@stage("generate")
def generate_stage(params: dict, args: argparse.Namespace) -> None:
    """Write the embedded synthetic dataset (MVTec AD layout)."""
    from .data.synthetic import generate

    p = section(params, "generate", ("root",))
    root = generate(
        p["root"], p.get("categories"), int(p.get("train_per_category", 60)), int(p.get("test_good_per_category", 12)),
        int(p.get("test_per_defect", 5)), int(p.get("size", 256)), int(p.get("seed", 0)),
    )
    print(f"wrote synthetic dataset to {root}")


@stage("prepare")
def prepare_stage(params: dict, args: argparse.Namespace) -> None:
    """Read the configured sources and write the manifest (with the seeded validation split)."""
    from .data import read_sources
    from .data.manifest import build_manifest, write_manifest

    p = section(params, "prepare", ("sources", "manifest"))
    frame = build_manifest(read_sources(p["sources"]), float(p.get("val_fraction", 0.1)), int(p.get("seed", 0)))
    write_manifest(frame, p["manifest"])
    counts = frame.groupby(["category", "split"]).size().unstack(fill_value=0)
    print(f"wrote {p['manifest']}: {len(frame)} images\n{counts.to_string()}")


@stage("features")
def features_stage(params: dict, args: argparse.Namespace) -> None:
    """Extract and cache the backbone pyramid of every manifest image."""
    from .data.manifest import manifest_hash, read_manifest
    from .features import BackboneSpec, extract_features

    manifest_path = section(params, "prepare", ("manifest",))["manifest"]
    p = section(params, "features", ("backbone", "image_size", "cache"))
    spec = BackboneSpec.from_params(p)
    index = extract_features(
        read_manifest(manifest_path), spec, manifest_hash(manifest_path), p["cache"],
        int(p.get("shard_size", 64)), int(p.get("batch_size", 16)), str(p.get("device", "auto")),
    )
    print(f"feature cache {p['cache']}: {len(index['entries'])} images, {len(index['shards'])} shards, key {index['key']}")


@stage("summary")
def summary_stage(params: dict, args: argparse.Namespace) -> None:
    """Print a table of what the stages produced."""
    from .report import print_summary

    print_summary(params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqflow", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, fn in STAGES.items():
        sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
    args = parser.parse_args(argv)
    try:
        STAGES[args.stage](load_params(args.params), args)
    except (ParamsError, FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vqflow {args.stage}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
