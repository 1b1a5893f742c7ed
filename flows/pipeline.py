"""The pipeline as a Prefect flow: one task per DVC stage (`dvc repro --single-item`, which runs `vqflow <stage>`).

DVC is the only cache: `dvc repro` skips a stage whose dependencies, params and outputs match dvc.lock. (A second,
Prefect-level result cache keyed on the inputs was removed: after the retrain flow rolls a checkout back, the
outputs on disk are older than a result cached by the rolled-back run, and the stage must run again.)
A stage's exit code says what failed (vqflow.cli: 1 bad data, 2 bad params or input, 70 a bug, 75 transient
I/O / network / storage); only transient failures are retried. Stage output reaches the run logs line by line,
as it is printed.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from vqflow import stages
from vqflow.config import ParamsError, load_params
from vqflow.io import read_json
from vqflow.metrics import REPORTED

STAGES = stages.ORDER


class StageInputError(ValueError):
    """A stage failed on its params or input files: permanent, never retried."""


class StageFailed(RuntimeError):
    """A stage failed for a reason retrying cannot fix (a bug, a model error)."""


class TransientStageError(RuntimeError):
    """A stage failed on I/O, network or storage (exit 75), or was killed: worth retrying."""


PERMANENT = (
    stages.DataValidationError,
    ParamsError,
    StageInputError,
    StageFailed,
    ValueError,
    KeyError,
    FileNotFoundError,
)


def _transient(task, task_run, state) -> bool:
    try:
        state.result()
    except PERMANENT:
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_transient, task_run_name="{stage}")
def run_stage(stage: str, repo: str, force: bool = False, env: dict[str, str] | None = None) -> str:
    """`dvc repro --single-item <stage>` in ``repo``: DVC records it in dvc.lock, the CLI runs `vqflow.stages`;
    ``env``: variables added to the stage's environment."""
    import os
    import re
    import subprocess
    import sys

    logger = get_run_logger()
    dvc = str(Path(sys.executable).parent / "dvc")
    command = [dvc, "repro", "--single-item", stage] + (["--force"] if force else [])
    tail: list[str] = []
    with subprocess.Popen(
        command,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, **(env or {})},
    ) as process:
        for line in process.stdout:  # streamed: a long stage shows its progress while it runs
            line = line.rstrip()
            if line.strip() and "it/s]" not in line and "s/it]" not in line:
                logger.info(line)
                tail = (tail + [line])[-12:]
    if process.returncode == 0:
        return stage
    # dvc reports the command's own exit code as "... exited with N"; a kill shows as a negative code
    found = re.findall(r"exited with (-?\d+)", "\n".join(tail))
    code = int(found[-1]) if found else process.returncode
    message = f"stage {stage} failed (exit {code}):\n" + "\n".join(tail)
    raise {1: stages.DataValidationError, 2: StageInputError, 75: TransientStageError}.get(
        code, TransientStageError if code < 0 else StageFailed
    )(message)


def metrics_artifacts(repo: Path, params: dict) -> dict:
    """Markdown + table artifacts of the evaluation metrics; returns the metrics."""
    from vqflow.report import metrics_markdown

    metrics = read_json(repo / params["outputs"]["metrics"])
    create_markdown_artifact(
        key="vqflow-metrics",
        markdown=f"# vqflow metrics ({metrics.get('model')})\n\n" + metrics_markdown(metrics),
        description="test metrics per category (%)",
    )
    rows = [
        {"category": c, **{k: round(100 * m[k], 2) for k in REPORTED if k in m}}
        for c, m in list(metrics["per_category"].items()) + [("mean", metrics["mean"])]
    ]
    create_table_artifact(key="vqflow-metrics-table", table=rows, description="test metrics per category (%)")
    return metrics


@flow(name="vqflow-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    stages_to_run: list[str] | None = None,
    force: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """generate -> prepare -> validate -> features -> train -> calibrate -> package -> evaluate -> export in a
    git + DVC repo; ``env``: variables added to every stage's environment."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    selected = [s for s in STAGES if s in (stages_to_run or STAGES)]
    for stage in selected:
        run_stage(stage, str(root), stage in (force or []), env)
    return metrics_artifacts(root, params) if "evaluate" in selected else {}


if __name__ == "__main__":
    pipeline()
