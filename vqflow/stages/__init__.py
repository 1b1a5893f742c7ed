"""The pipeline stages, one module per DVC stage: ``vqflow.stages.<stage>.run(params)``.

The CLI, DVC (`vqflow <stage>`) and the Prefect flows call them. This package imports none of its stage modules,
so a stage runs (and dvc.yaml declares as its code) only what its own module imports.
"""

from __future__ import annotations

import importlib
from typing import Any

ORDER = ("generate", "prepare", "validate", "features", "train", "calibrate", "package", "evaluate", "export")
MODEL = ("train", "calibrate", "package")  # the stages that turn cached features into a model bundle


class DataValidationError(RuntimeError):
    """The data failed the validation gate; the message lists the failed checks and files."""


def run(stage: str, params: dict, **options: Any) -> Any:
    """Run one stage (a name of ``ORDER``, or ``promote``) on ``params``."""
    return importlib.import_module(f"{__name__}.{stage}").run(params, **options)


def run_all(params: dict, stages: tuple[str, ...] = ORDER) -> None:
    """Run ``stages`` in pipeline order (tests and benches: the pipeline without DVC)."""
    for stage in (s for s in ORDER if s in stages):
        run(stage, params)
