"""The `vqflow` command: one subcommand per pipeline stage, each reading its params.yaml sections."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Callable

from . import stages
from .config import ParamsError, load_params, train_recipe

STAGES: dict[str, Callable[[dict, argparse.Namespace], None]] = {}

# exit codes: what a caller (DVC, the Prefect flows, a shell) can do about a failure
EXIT_BAD_DATA = 1  # the data gate failed: fix the data, retrying cannot help
EXIT_BAD_INPUT = 2  # bad params, missing or unreadable input files: permanent
EXIT_FAILED = 70  # a bug or a model error (sysexits EX_SOFTWARE): permanent
EXIT_TRANSIENT = 75  # I/O, network or storage trouble (sysexits EX_TEMPFAIL): worth retrying


def stage(name: str):
    def register(fn: Callable[[dict, argparse.Namespace], None]):
        STAGES[name] = fn
        return fn

    return register


@stage("generate")
def generate_stage(params: dict, args: argparse.Namespace) -> None:
    """Write the embedded synthetic dataset (MVTec AD layout)."""
    print(f"wrote synthetic dataset to {stages.run('generate', params)}")


@stage("prepare")
def prepare_stage(params: dict, args: argparse.Namespace) -> None:
    """Read the configured sources and write the manifest (with the seeded validation split)."""
    frame = stages.run("prepare", params)
    counts = frame.groupby(["category", "split"]).size().unstack(fill_value=0)
    print(f"wrote {params['prepare']['manifest']}: {len(frame)} images\n{counts.to_string()}")


@stage("validate")
def validate_stage(params: dict, args: argparse.Namespace) -> None:
    """Run the Great Expectations gate on the manifest; exit non-zero when the data is wrong."""
    from .report import print_validation

    print_validation(stages.run("validate", params))


@stage("features")
def features_stage(params: dict, args: argparse.Namespace) -> None:
    """Extract and cache the backbone pyramid of every manifest image."""
    index, extracted = stages.run("features", params)
    print(f"feature cache {params['features']['cache']}: {len(index['entries'])} images ({extracted} extracted now)")


@stage("train")
def train_stage(params: dict, args: argparse.Namespace) -> None:
    """Train the configured model (model.name) on the cached features of the train split."""
    print(f"saved the weights to {stages.run('train', params)}")


@stage("calibrate")
def calibrate_stage(params: dict, args: argparse.Namespace) -> None:
    """Fit the per-category thresholds of the trained weights on the validation split (normal images)."""
    thresholds = stages.run("calibrate", params)
    print(f"calibrated the thresholds of {len(thresholds['categories'])} categories on the validation split")


@stage("package")
def package_stage(params: dict, args: argparse.Namespace) -> None:
    """Write the self-contained model bundle (weights, thresholds, folded backbone, model.onnx)."""
    print(f"wrote the model bundle {stages.run('package', params)}")


@stage("evaluate")
def evaluate_stage(params: dict, args: argparse.Namespace) -> None:
    """Score the test split and write per-category metrics."""
    from .report import print_metrics

    print_metrics(stages.run("evaluate", params))


@stage("export")
def export_stage(params: dict, args: argparse.Namespace) -> None:
    """Import the model into the BentoML store (champion only if not worse than the current one)."""
    record = stages.run("export", params)
    print(f"exported {record['tag']} as {record['role']}: " + "; ".join(record["reasons"]))


@stage("promote")
def promote_stage(params: dict, args: argparse.Namespace) -> None:
    """Make a stored model the champion on purpose, if it is not worse than the current one."""
    from .stages.export import promote

    record = promote(params, args.tag, args.new_line)
    print(f"{record['tag']} is the champion: " + "; ".join(record["reasons"]))


@stage("predict")
def predict_stage(params: dict, args: argparse.Namespace) -> None:
    """Score images with a trained model: print score and decision, write overlay PNGs."""
    from .config import ServeSettings
    from .inference import Predictor, render_overlay

    if not args.images:
        raise ValueError("predict: name at least one image file")
    model_dir = args.model or params.get("outputs", {}).get("model", "models/model")
    settings = ServeSettings.load(params)
    predictor = Predictor(model_dir, settings.device, settings.max_pixels, settings.runtime, settings.torch_threads)
    predictor.check_category(args.category)
    from .data.images import ImageLoadError, read_bytes
    from .io import atomic_path

    targets = overlay_paths(args.images, Path(args.out))
    failures = 0
    for path in args.images:
        try:
            image = predictor.decode(read_bytes(path), path)
        except ImageLoadError as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        result = predictor.predict([image], args.category)[0]
        overlay_path = targets[path]
        overlay_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(overlay_path) as tmp:
            tmp.write_bytes(render_overlay(image, result, predictor.spec.image_size))
        decision = "ANOMALOUS" if result.is_anomaly else "normal"
        concept = f" concept={result.concept}" if result.concept is not None else ""
        print(
            f"{path}: score={result.score:.6f} threshold={result.threshold:.6f} {decision}{concept} -> {overlay_path}"
        )
    if failures:
        raise ValueError(f"{failures} of {len(args.images)} images could not be read")


def overlay_paths(images: list[str], out: Path) -> dict[str, Path]:
    """Where each input's overlay goes: its path below the inputs' common folder, mirrored under ``out``
    (``a/good/000.png`` and ``b/good/000.png`` -> ``out/a/good/000_overlay.png``, ``out/b/...``); inputs all in
    one folder keep that folder's name. Two different inputs never share an overlay."""
    folders = [Path(os.path.abspath(p)).parent for p in images]
    common = Path(os.path.commonpath(folders)) if folders else Path(".")
    if all(f == common for f in folders):
        common = common.parent
    return {
        p: out / Path(os.path.abspath(p)).relative_to(common).with_name(Path(p).stem + "_overlay.png") for p in images
    }


@stage("feedback")
def feedback_stage(params: dict, args: argparse.Namespace) -> None:
    """Store images an operator confirmed (normal: into the retrain inbox; defective: for review)."""
    import io
    import os

    from PIL import Image

    from .config import ServeSettings
    from .data.images import read_bytes
    from .bundle import ModelBundle
    from .feedback import FeedbackStore
    from .inference import Predictor
    from .model_store import model_tag

    if not args.images:
        raise ValueError("feedback: name at least one image file")
    settings = ServeSettings.load(params)
    store = FeedbackStore(
        args.inbox or settings.inbox or os.environ.get("VQFLOW_INBOX") or "data/inbox", settings.review
    )
    model_dir = args.model or params.get("outputs", {}).get("model", "models/model")
    predictor = Predictor(model_dir, settings.device, settings.max_pixels, settings.runtime, settings.torch_threads)
    predictor.check_category(args.category)
    tag = model_tag(ModelBundle(model_dir))  # the content tag: the model store's name for this model
    for path in args.images:  # every file is checked before anything is stored
        predictor.decode(read_bytes(path), path)
    for path in args.images:
        data = read_bytes(path)
        (result,) = predictor.predict([predictor.decode(data, path)], args.category)
        stored = store.put(data, Image.open(io.BytesIO(data)).format, args.category, args.label, **result.decision(tag))
        state = "already stored" if stored.duplicate else "stored"
        print(f"{path}: {args.label}, score={result.score:.6f} -> {state} as {stored.location}")


@stage("export-onnx")
def export_onnx_stage(params: dict, args: argparse.Namespace) -> None:
    """Add model.onnx (backbone + model + maps + score, checked against torch) to a trained model bundle."""
    from .bundle import ModelBundle

    bundle = ModelBundle(args.model or params.get("outputs", {}).get("model", "models/model"))
    path = bundle.add_onnx()
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, ONNX Runtime agrees with torch (serve.runtime: onnx)")


@stage("summary")
def summary_stage(params: dict, args: argparse.Namespace) -> None:
    """Print a table of what the stages produced."""
    from .report import print_summary

    print_summary(params)


# AVX-512 kernels round differently from AVX2 ones: unpinned, the same training on an AVX-512 machine diverged in the
# 7th digit and did not reproduce dvc.lock; pinned, it matched an AVX2 machine's bit for bit. Set before torch loads
# (the stages import it lazily); a user's own setting wins. Not pinned: the train stage of a bfloat16 run.
REPRODUCIBLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> None:
    if platform.machine().lower() in ("x86_64", "amd64") and "torch" not in sys.modules:
        for key, value in REPRODUCIBLE_KERNELS.items():
            os.environ.setdefault(key, value)


def trains_in_bfloat16(params: dict) -> bool:
    """Whether the configured model's training precision (``train.precision``, or its ``train.per_model`` recipe's)
    is bfloat16, whose kernels are AVX-512 / AMX ones: that run cannot be pinned to AVX2 (~10x slower there), and
    rounds differently on every CPU type anyway."""
    train, model = params.get("train"), params.get("model")
    if not isinstance(train, dict) or not isinstance(model, dict):
        return False  # malformed params: the stage names the field
    try:
        return train_recipe(train, model.get("name")).get("precision") == "bfloat16"
    except (AttributeError, TypeError):  # a per_model that is not a mapping: the train stage names it
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqflow", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, fn in STAGES.items():
        command = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        if name == "promote":
            command.add_argument("tag", help="model tag, e.g. vqflow-anomaly:0123abcd... (bentoml models list)")
            command.add_argument(
                "--new-line",
                action="store_true",
                help="start a new champion line with it, compared with no earlier champion (the record says so)",
            )
        if name == "predict":
            command.add_argument("images", nargs="*", help="image files to score")
            command.add_argument("--model", help="model directory (default: outputs.model of params)")
            command.add_argument("--category", help="category whose threshold applies (default: the global one)")
            command.add_argument("--out", default="predictions", help="folder for the overlay PNGs")
        if name == "export-onnx":
            command.add_argument("--model", help="model directory (default: outputs.model of params)")
        if name == "feedback":
            command.add_argument("images", nargs="*", help="image files the operator judged")
            command.add_argument("--category", required=True, help="the images' category")
            command.add_argument("--label", choices=["normal", "defective"], default="normal")
            command.add_argument(
                "--inbox", help="folder or s3:// prefix (default: serve.inbox, $VQFLOW_INBOX, data/inbox)"
            )
            command.add_argument("--model", help="model directory that scores them (default: outputs.model)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if not (args.stage == "train" and trains_in_bfloat16(params)):
            pin_cpu_kernels()
        STAGES[args.stage](params, args)
    except stages.DataValidationError as exc:
        from .report import print_validation

        print_validation(getattr(exc, "report", None))
        print(f"vqflow {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except (
        ParamsError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        FileExistsError,
        PermissionError,
        ValueError,
        KeyError,
    ) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vqflow {args.stage}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        # the OSErrors left after the input errors above: I/O, connection, timeout
        if isinstance(exc, OSError) or _is_transient_storage_error(exc):
            print(f"vqflow {args.stage}: transient error, retry: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_TRANSIENT
        import traceback

        traceback.print_exc()
        print(f"vqflow {args.stage}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _is_transient_storage_error(exc: Exception) -> bool:
    """S3 / HTTP client errors that are not OSError subclasses (botocore's connection and throttling errors)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError
    except ImportError:
        return False
    return isinstance(exc, (BotoConnectionError, ReadTimeoutError))


if __name__ == "__main__":
    sys.exit(main())
