"""Scheduled retraining: new normal images in the inbox -> validated -> versioned -> pipeline -> promotion.

Nothing is lost when a step fails: inbox images are copied into the dataset under their content's name
(sha256, so a repeated run is idempotent) and leave the inbox only after the pipeline succeeded; a failed run
resets the checkout to the commit it started from (`git reset --hard` + `dvc checkout`, which works with DVC's
autostage) and removes its copies, and the original error is raised. A run that was killed leaves its copies
(and maybe its data commit): the next run recognises those inbox images by content, skips re-validating them
against a dataset that already holds them, and finishes the job. The champion changes only through the export
stage's not-worse rule. Run it in a checkout of its own: the reset discards uncommitted changes there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import pipeline
from vqflow.config import load_params
from vqflow.data.manifest import read_manifest
from vqflow.validation import validate_inbox
from vqflow.validation.inbox import inbox_samples

ADDED = "data/added"  # prepare.sources holds {kind: normal_folder, root: data/added}


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _dvc(root: Path, *args: str) -> str:
    return _run([str(Path(sys.executable).parent / "dvc"), *args], root)


@task
def check_inbox(root: str, inbox: str) -> dict:
    """Validate every inbox image against the current dataset: {"accepted": [...], "rejected": {path: reasons}}."""
    params = load_params(Path(root) / "params.yaml")
    manifest = read_manifest(Path(root) / params["prepare"]["manifest"])
    verdict = validate_inbox(Path(root) / inbox, manifest, params["validate"])
    return {"accepted": verdict.accepted, "rejected": verdict.rejected}


@task
def quarantine(root: str, inbox: str, rejected: dict[str, list[str]], folder: str) -> list[str]:
    """Move rejected images to ``folder/<category>/`` with a ``.reason.txt`` beside each."""
    moved = []
    for path, reasons in rejected.items():
        source = Path(path)
        target = Path(root) / folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), target)
        target.with_name(target.name + ".reason.txt").write_text("\n".join(reasons) + "\n")
        moved.append(str(target))
    return moved


def content_copy(root: Path, inbox_image: Path) -> Path:
    """Where an inbox image lives in the dataset: data/added/<category>/<sha256 of its bytes><suffix>."""
    digest = hashlib.sha256(inbox_image.read_bytes()).hexdigest()[:32]
    return root / ADDED / inbox_image.parent.name / f"{digest}{inbox_image.suffix.lower()}"


@task
def add_to_dataset(root: str, accepted: list[str]) -> list[str]:
    """Copy accepted images to data/added/<category>/ under their content's name (the inbox keeps them until
    the run succeeded); an image already there is not copied again."""
    copies = []
    for path in accepted:
        target = content_copy(Path(root), Path(path))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target.with_suffix(target.suffix + ".part"))
            target.with_suffix(target.suffix + ".part").replace(target)
        copies.append(str(target))
    return copies


@task
def version_data(root: str, count: int, push: bool) -> str:
    """`dvc add data/added`, commit the pointer; push to the remote when one is configured. Returns the commit."""
    repo = Path(root)
    _dvc(repo, "add", ADDED)
    _run(["git", "add", f"{ADDED}.dvc", "data/.gitignore"], repo)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=repo).returncode:  # else: committed by a killed run
        _run(["git", "commit", "-q", "-m", f"retrain: add {count} validated normal images"], repo)
    if push and _dvc(repo, "remote", "list").strip():
        _dvc(repo, "push")
    return _run(["git", "rev-parse", "HEAD"], repo).strip()


def _roll_back(root: Path, head: str, new_copies: list[str], logger) -> None:
    """Back to ``head``: git state (autostaged files included), DVC outputs, and none of the copies this run made;
    a problem here is logged, never raised over the error that caused the rollback."""
    steps = [lambda: _run(["git", "reset", "-q", "--hard", head], root)]
    steps += [lambda copy=copy: Path(copy).unlink(missing_ok=True) for copy in new_copies]
    steps.append(lambda: _dvc(root, "checkout", "--force", "--quiet"))
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - keep rolling back, report, let the original error surface
            logger.error("rollback step failed: %s", exc)
    logger.error("retraining failed: the checkout is back at %s, the inbox and the champion are unchanged", head[:8])


def _champion(root: Path) -> dict | None:
    from vqflow.registry import DEFAULT_RECORD, champion

    return champion(root / load_params(root / "params.yaml").get("outputs", {}).get("champions", DEFAULT_RECORD))


def _comparison(before: dict | None, after: dict) -> str:
    lines = ["| category | champion mAD | challenger mAD | change |", "|---|---:|---:|---:|"]
    for category, values in after["per_category"].items():
        old = (before or {}).get("per_category", {}).get(category, {}).get("mad")
        new = values["mad"]
        change = f"{100 * (new - old):+.2f}" if old is not None else "new"
        lines.append(f"| {category} | {'-' if old is None else f'{100 * old:.2f}'} | {100 * new:.2f} | {change} |")
    return "\n".join(lines)


@flow(name="vqflow-retrain", log_prints=True)
def retrain(repo: str = ".", inbox: str = "data/inbox", quarantine_dir: str = "data/quarantine", push: bool = True) -> dict:
    """Retrain when new normal images are waiting in ``inbox/<category>/``; promote only if not worse."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    if not inbox_samples(root / inbox):
        logger.info("inbox %s is empty: nothing to do", root / inbox)
        return {"status": "empty"}
    # images a killed run already copied: validated then, part of the dataset now (re-checking would call
    # them duplicates of themselves)
    waiting = [Path(sample.path) for sample in inbox_samples(root / inbox)]
    pending = [str(path) for path in waiting if content_copy(root, path).exists()]
    verdict = check_inbox(str(root), inbox) if len(pending) < len(waiting) else {"accepted": [], "rejected": {}}
    rejected = {path: reasons for path, reasons in verdict["rejected"].items() if path not in pending}
    moved = quarantine(str(root), inbox, rejected, quarantine_dir)
    for path in moved:
        logger.warning("quarantined %s", path)
    fresh = sorted(set(verdict["accepted"]) - set(pending))
    if pending:
        logger.info("%d inbox images were added by an interrupted run: finishing it", len(pending))
    if not fresh + pending:
        return {"status": "all rejected", "quarantined": moved}
    before = _champion(root)
    before_metrics = before["metrics"] if before else None
    head = _run(["git", "rev-parse", "HEAD"], root).strip()
    new_copies = add_to_dataset(str(root), fresh)  # the pending images' copies exist already
    copies = new_copies + [str(content_copy(root, Path(path))) for path in pending]
    try:
        commit = version_data(str(root), len(copies), push)
        metrics = pipeline(str(root), stages_to_run=["prepare", "validate", "features", "train", "evaluate", "export"],
                           force=["prepare"])
    except Exception:
        _roll_back(root, head, new_copies, logger)
        raise
    for path in fresh + pending:
        Path(path).unlink()
    params = load_params(root / "params.yaml")
    record = json.loads((root / params["outputs"]["export"]).read_text())
    create_markdown_artifact(
        key="vqflow-retrain", description="challenger vs champion",
        markdown=f"# Retraining: {len(copies)} new images, model {record['tag']} is **{record['role']}**\n\n"
                 + "; ".join(record["reasons"]) + "\n\n" + _comparison(before_metrics, metrics))
    record_file = params["outputs"].get("champions", "registry/champions.json")
    _run(["git", "add", "dvc.lock", *([record_file] if (root / record_file).is_file() else [])], root)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode:
        _run(["git", "commit", "-q", "-m", f"retrain: pipeline on data commit {commit[:8]} -> {record['role']}"], root)
    return {"status": record["role"], "tag": record["tag"], "added": copies, "quarantined": moved,
            "champion_before": before["tag"] if before else None, "champion_after": (_champion(root) or {}).get("tag")}


if __name__ == "__main__":
    retrain()
