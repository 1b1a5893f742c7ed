"""Scheduled retraining: new normal images in the inbox -> validated -> versioned -> pipeline -> promotion.

A run is a transaction on the checkout's branch B (e.g. main):
1. recover: a branch ``vqflow-retrain/B`` left by a killed run means that run never finished; back to B
   (`git checkout -f`, `git reset --hard`, `dvc checkout --force`); data/added is the flow's own folder: a file
   there that B does not commit is a copy of an image still in the inbox, and is removed;
2. inbox images already committed on B (a run killed after it landed) are published and leave the inbox;
3. the rest are validated against the dataset (bad ones go to the quarantine with the reasons);
4. on ``vqflow-retrain/B``: copy the accepted images to data/added under their content's name (sha256),
   `dvc add` + commit, run the pipeline (the export stage promotes only if not worse; with
   ``retrain.approval: required`` it holds the promotion and the run pauses for a person's answer, flows/approval.py),
   commit dvc.lock and the champion record, `dvc push`;
5. land: B is fast-forwarded to the transaction branch (`git update-ref` with the old value, atomic), `git push`;
6. only now do the images leave the inbox.
A failure in 4-5 returns to B as in 1 and raises the original error; a kill -9 anywhere leaves a state that 1-2 of
the next run repair. Run it in a checkout of its own (one run at a time: prefect.yaml's concurrency limit).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import approval
from flows.pipeline import STAGES, TransientStageError, pipeline, run_stage
from vqflow.config import load_params
from vqflow.data.manifest import read_manifest
from vqflow.io import read_json
from vqflow.model_store import HOLD_VARIABLE, NOTE_VARIABLE, TRANSACTION_PREFIX
from flows import inbox as inbox_store
from vqflow.feedback import SIDECAR
from vqflow.validation import validate_inbox

ADDED = "data/added"  # prepare.sources holds {kind: normal_folder, root: data/added}
IDENTITY = {
    "GIT_AUTHOR_NAME": "vqflow retrain",
    "GIT_AUTHOR_EMAIL": "vqflow-retrain@localhost",
    "GIT_COMMITTER_NAME": "vqflow retrain",
    "GIT_COMMITTER_EMAIL": "vqflow-retrain@localhost",
}


class ApprovalTimeout(RuntimeError):
    """Nobody answered a paused run in time (retrain.approval_timeout_hours): the run rolls back."""


class CheckoutNotClean(RuntimeError):
    """The retrain checkout has changes the flow did not make: it refuses to commit or discard them."""


@functools.cache
def _environment(cwd: Path) -> dict[str, str]:
    """The commands' environment: a fresh worker has no git identity, so commits get the flow's own; the stages'
    commands (`vqflow ...` in dvc.yaml) are this interpreter's, found first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if subprocess.run(["git", "config", "user.email"], cwd=cwd, capture_output=True).returncode:
        env.update({k: v for k, v in IDENTITY.items() if k not in env})
    return env


def _run(command: list[str], cwd: Path, transient: bool = False) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_environment(cwd))
    if result.returncode != 0:
        error = TransientStageError if transient else RuntimeError  # network: git push, dvc push
        raise error(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _git(root: Path, *args: str, transient: bool = False) -> str:
    return _run(["git", *args], root, transient).strip()


def _dvc(root: Path, *args: str, transient: bool = False) -> str:
    return _run([str(Path(sys.executable).parent / "dvc"), *args], root, transient)


def content_copy(root: Path, inbox_image: Path) -> Path:
    """Where an inbox image lives in the dataset: data/added/<category>/<sha256 of its bytes><suffix>."""
    digest = hashlib.sha256(inbox_image.read_bytes()).hexdigest()[:32]
    return root / ADDED / inbox_image.parent.name / f"{digest}{inbox_image.suffix.lower()}"


def committed_copies(root: Path) -> set[str]:
    """Paths (relative to the repo) of the images data/added holds in the commit HEAD points to."""
    from dvc.api import DVCFileSystem

    if not (root / f"{ADDED}.dvc").is_file():
        return set()
    return set(DVCFileSystem(str(root), rev="HEAD").find(ADDED, detail=False))


@task
def recover(root: str) -> list[str]:
    """Undo what a killed run left behind (see the module docstring); returns what was done."""
    repo, done = Path(root), []
    git_dir = repo / ".git"
    for lock in [git_dir / "index.lock", git_dir / "HEAD.lock", *(git_dir / "refs").rglob("*.lock")]:
        if lock.exists():  # a git command was killed; no other git process works here (one run at a time)
            lock.unlink()
            done.append(f"removed a stale {lock.relative_to(repo)}")
    current = _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    leftovers = _git(repo, "for-each-ref", "--format=%(refname:short)", f"refs/heads/{TRANSACTION_PREFIX}").split()
    if current.startswith(TRANSACTION_PREFIX):
        _git(repo, "checkout", "-q", "-f", current[len(TRANSACTION_PREFIX) :])
    if leftovers:
        _git(repo, "reset", "-q", "--hard")
        for branch in leftovers:
            _git(repo, "branch", "-q", "-D", branch)
        _dvc(repo, "checkout", "--force", "--quiet")
        done.append(
            f"an interrupted run left {', '.join(leftovers)}: back to {_git(repo, 'rev-parse', '--short', 'HEAD')}"
        )
    committed = committed_copies(repo)
    for path in sorted(p for p in (repo / ADDED).rglob("*") if p.is_file()) if (repo / ADDED).is_dir() else []:
        if str(path.relative_to(repo)) not in committed:  # a copy of an image that is still in the inbox
            path.unlink()
            done.append(f"removed {path.relative_to(repo)}: copied by an interrupted run, not committed")
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        raise CheckoutNotClean(
            f"the retrain checkout {repo} has uncommitted changes ({dirty.splitlines()[0]} ...):"
            " commit or discard them; the flow commits only its own work"
        )
    return done


@task
def check_inbox(root: str, folder: str) -> dict:
    """Validate every image of the (local) inbox folder against the current dataset:
    {"accepted": [...], "rejected": {path: reasons}}."""
    params = load_params(Path(root) / "params.yaml")
    manifest_path = Path(root) / params["prepare"]["manifest"]
    if not manifest_path.is_file():  # a bare clone (no `dvc pull` yet): the data set the inbox is checked against
        print(f"{params['prepare']['manifest']} is missing: `dvc repro prepare` first")
        _dvc(Path(root), "repro", "--quiet", "prepare")
    verdict = validate_inbox(folder, read_manifest(manifest_path), params["validate"])
    return {"accepted": verdict.accepted, "rejected": verdict.rejected}


@task
def quarantine(root: str, inbox: str, rejected: dict[str, list[str]], folder: str) -> list[str]:
    """Move rejected images (with their sidecars) out of the inbox to ``folder/<category>/``, a ``.reason.txt``
    beside each."""
    moved = []
    for path, reasons in rejected.items():
        source = Path(path)
        target = Path(root) / folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_name(target.name + ".reason.txt").write_text("\n".join(reasons) + "\n")
        for item in (source, source.with_name(source.name + SIDECAR)):
            if item.exists():
                shutil.copy2(item, target.with_name(item.name))
        inbox_store.remove(Path(root), inbox, source)
        moved.append(str(target))
    return moved


@task
def add_to_dataset(root: str, accepted: list[str]) -> list[str]:
    """Copy accepted images to data/added/<category>/ under their content's name (atomically; the inbox keeps
    them until the run landed), with their feedback sidecars; an image already there is not copied again."""
    copies = []
    for path in accepted:
        image = content_copy(Path(root), Path(path))
        sidecar = Path(path + SIDECAR)
        pairs = [(Path(path), image)] + ([(sidecar, image.with_name(image.name + SIDECAR))] if sidecar.exists() else [])
        for source, target in reversed(pairs):  # the sidecar first: a copied image always has its record
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.part")
                shutil.copy2(source, partial)
                partial.replace(target)
        copies.append(str(image))
    return copies


@task
def version_data(root: str, count: int) -> str:
    """`dvc add data/added` and commit the pointer; returns the commit."""
    repo = Path(root)
    _dvc(repo, "add", "--quiet", ADDED)
    print(f"versioned {ADDED} ({count} new images)")
    _git(repo, "add", f"{ADDED}.dvc", "data/.gitignore")
    _git(repo, "commit", "-q", "-m", f"retrain: add {count} validated normal images")
    commit = _git(repo, "rev-parse", "HEAD")
    print(f"committed the data as {commit[:8]}")
    return commit


def git_kept_outputs(root: Path) -> list[str]:
    """The outputs dvc.yaml keeps in git (``cache: false``: metrics, plot data, the champion record) that exist,
    with their ``${}`` paths resolved by DVC."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [out for stage in repo.index.stages for out in stage.outs if not out.use_cache]
        return sorted(str(Path(out.fs_path).relative_to(root)) for out in outs if Path(out.fs_path).exists())


def _remote(root: Path, branch: str) -> str | None:
    configured = subprocess.run(["git", "config", f"branch.{branch}.remote"], cwd=root, capture_output=True, text=True)
    remotes = _git(root, "remote").split()
    return configured.stdout.strip() or ("origin" if "origin" in remotes else None)


@task
def publish(root: str, branch: str, data_only: bool = False) -> list[str]:
    """`dvc push` (when a DVC remote is configured), then `git push` of ``branch`` (when it has a remote)."""
    repo, done = Path(root), []
    if _dvc(repo, "remote", "list").strip():
        _dvc(repo, "push", "--quiet", transient=True)
        done.append("dvc push")
    remote = _remote(repo, branch)
    if remote and not data_only:
        _git(repo, "push", "-q", remote, f"{branch}:{branch}", transient=True)
        done.append(f"git push {remote} {branch}")
    return done


def _land(root: Path, branch: str, start: str) -> str:
    """Fast-forward ``branch`` from ``start`` to the transaction branch's commit and switch back to it."""
    transaction, new = TRANSACTION_PREFIX + branch, _git(root, "rev-parse", "HEAD")
    _git(root, "update-ref", f"refs/heads/{branch}", new, start)  # fails if branch moved: never a lost update
    _git(root, "checkout", "-q", branch)
    _git(root, "branch", "-q", "-D", transaction)
    print(f"landed: {branch} is now {new[:8]}")
    return new


def _return_to(root: Path, branch: str, logger) -> None:
    """After a failure: back to ``branch`` by recover(); a problem here is logged, never raised over the error
    that caused it."""
    try:
        recover.fn(str(root))
    except Exception as exc:  # noqa: BLE001 - the original error must surface
        logger.error("returning to %s failed (the next run retries it): %s", branch, exc)
    logger.error("retraining failed: the checkout is back on %s, the inbox and the champion are unchanged", branch)


def _champion(root: Path) -> dict | None:
    from vqflow.model_store import DEFAULT_RECORD, champion

    return champion(root / load_params(root / "params.yaml").get("outputs", {}).get("champions", DEFAULT_RECORD))


def _settle(root: Path, inbox: str, inbox_images: list[Path], branch: str, push: bool, logger) -> list[Path]:
    """Inbox images whose copies are committed on ``branch`` (a run was killed after landing): publish, then
    remove them from the inbox. Returns the images still waiting."""
    committed = committed_copies(root)
    settled = [p for p in inbox_images if str(content_copy(root, p).relative_to(root)) in committed]
    if settled:
        done = publish(str(root), branch) if push else []
        for path in settled:
            inbox_store.remove(root, inbox, path)
        logger.info(
            "%d inbox images were already committed by an interrupted run (%s): removed from the inbox",
            len(settled),
            ", ".join(done) or "nothing to push",
        )
    return [p for p in inbox_images if p not in settled]


@flow(name="vqflow-retrain", log_prints=True)
def retrain(repo: str = ".", inbox: str = "data/inbox", quarantine_dir: str | None = None, push: bool = True) -> dict:
    """Retrain when new normal images are waiting in ``inbox/<category>/`` (a folder relative to ``repo`` or
    absolute, or an ``s3://`` prefix); promote only if not worse; with ``push``, publish the commits and data to
    the git and DVC remotes. Rejected images go to ``quarantine_dir`` (default: ``quarantine`` beside the inbox,
    or beside the staging folder of a remote inbox). At most ``retrain.max_per_category`` images of a category
    are taken per run (the oldest first); the rest wait for the next run."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    for note in recover(str(root)):
        logger.warning(note)
    params = load_params(root / "params.yaml")
    approval_mode, hours = approval.mode(params)
    if approval_mode == "required" and (waiting := approval.waiting_runs()):
        logger.warning("run %s still waits for an answer (python -m flows.approval): not retraining", waiting[0].id)
        return {"status": "waiting for approval", "run": str(waiting[0].id)}
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch == "HEAD":
        raise CheckoutNotClean(f"{root} is on a detached HEAD: retraining commits to a branch (check one out)")
    folder = inbox_store.fetch(root, inbox)
    waiting = _settle(root, inbox, inbox_store.waiting(root, inbox), branch, push, logger)
    if not waiting:
        return {"status": "empty"}
    verdict = check_inbox(str(root), str(folder))
    moved = quarantine(
        str(root), inbox, verdict["rejected"], inbox_store.quarantine_folder(root, inbox, quarantine_dir)
    )
    for path in moved:
        logger.warning("quarantined %s", path)
    cap = int((params.get("retrain") or {}).get("max_per_category", 0))
    accepted, deferred = inbox_store.capped(verdict["accepted"], cap)
    if deferred:
        logger.warning("%d accepted images wait for the next run (retrain.max_per_category: %d)", len(deferred), cap)
    if not accepted:
        return {"status": "all rejected", "quarantined": moved}
    feedback = inbox_store.from_feedback(accepted)
    before = _champion(root)
    metrics_path = root / params["outputs"]["metrics"]
    metrics_before = read_json(metrics_path) if metrics_path.is_file() else None
    start = _git(root, "rev-parse", "HEAD")
    _git(root, "checkout", "-q", "-b", TRANSACTION_PREFIX + branch)
    try:
        copies = add_to_dataset(str(root), accepted)
        print(f"copied {len(copies)} images to {ADDED}")
        data_commit = version_data(str(root), len(copies))
        held = {HOLD_VARIABLE: approval.hold_reason(None, hours)} if approval_mode == "required" else {}
        metrics = pipeline(
            str(root),
            stages_to_run=[s for s in STAGES if s != "generate"],
            force=["prepare"],
            env=held,
        )
        record = read_json(root / params["outputs"]["export"])
        if held and record["eligible"]:
            record = _decide_by_person(root, params, record, before, metrics, len(copies), hours)
        _git(root, "add", "-A", "--", "dvc.lock", *git_kept_outputs(root))
        _git(
            root,
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            f"retrain: pipeline on data commit {data_commit[:8]} -> {record['role']}",
        )
        if push:
            publish(str(root), branch, data_only=True)  # the data and outputs are remote before any commit names them
        _land(root, branch, start)
    except BaseException:
        _return_to(root, branch, logger)
        raise
    pushed = publish(str(root), branch) if push else []
    for path in accepted:
        inbox_store.remove(root, inbox, Path(path))
    rejects = false_rejects(
        root, params, metrics_before, metrics, [Path(copy) for path, copy in zip(accepted, copies) if path in feedback]
    )
    create_markdown_artifact(
        key="vqflow-retrain",
        description="challenger vs champion",
        markdown=f"# Retraining: {len(copies)} new images ({len(feedback)} confirmed normals from feedback), model "
        f"{record['tag']} is **{record['role']}**\n\n"
        + "; ".join(record["reasons"])
        + "\n\n"
        + approval.comparison(before["metrics"] if before else None, metrics)
        + "\n\n"
        + false_reject_table(rejects),
    )
    return {
        "status": record["role"],
        "tag": record["tag"],
        "added": copies,
        "from_feedback": len(feedback),
        "deferred": deferred,
        "false_rejects": rejects,
        "quarantined": moved,
        "pushed": pushed,
        "champion_before": before["tag"] if before else None,
        "champion_after": (_champion(root) or {}).get("tag"),
    }


def _decide_by_person(
    root: Path, params: dict, record: dict, before: dict | None, metrics: dict, images: int, hours: float
) -> dict:
    """Pause for a reviewer's answer, then re-run the export stage with it; returns its decision record."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    request = approval.request(record, before, metrics, images)
    create_markdown_artifact(key="vqflow-approval", markdown=request, description=f"promote {record['tag']}?")
    print(f"waiting for a person's answer about {record['tag']} (at most {hours:g} h; python -m flows.approval)")
    try:
        answer = pause_flow_run(
            wait_for_input=approval.Approval.with_initial_data(description=request),
            timeout=round(hours * 3600),
            poll_interval=min(10, max(1, round(hours * 360))),
        )
    except FlowPauseTimeout as exc:
        raise ApprovalTimeout(
            f"nobody answered within {hours:g} h (retrain.approval_timeout_hours) whether to promote {record['tag']}: "
            "nothing changed; the images stay in the inbox for the next run"
        ) from exc
    env = (
        {NOTE_VARIABLE: approval.promotion_note(answer)}
        if answer.promote
        else {HOLD_VARIABLE: approval.hold_reason(answer, hours)}
    )
    print(f"answer: {'promote' if answer.promote else 'keep'} ({answer.reviewer or 'no name'}: {answer.note or '-'})")
    run_stage("export", str(root), False, env)
    return read_json(root / params["outputs"]["export"])


def false_rejects(root: Path, params: dict, before: dict | None, after: dict, feedback_copies: list[Path]) -> dict:
    """Per category: the false-reject rate at the calibrated threshold on the test normals (held out from
    training and calibration) before and after the run, and how many of the feedback images (false alarms of
    the model that scored them) the new model still rejects at its threshold."""
    from vqflow.feedback import read_sidecar
    from vqflow.inference import Predictor

    report: dict[str, dict] = {}
    for category, at in after.get("at_threshold", {}).items():
        old = ((before or {}).get("at_threshold") or {}).get(category, {})
        report[category] = {"test_frr_before": old.get("false_reject_rate"), "test_frr_after": at["false_reject_rate"]}
    if feedback_copies:
        predictor = Predictor(root / params["outputs"]["model"], str(params.get("evaluate", {}).get("device", "auto")))
        manifest = read_manifest(root / params["prepare"]["manifest"]).set_index("path")
        for image in feedback_copies:
            category, sidecar = image.parent.name, read_sidecar(str(image)) or {}
            (result,) = predictor.predict([predictor.decode(image.read_bytes(), str(image))], category)
            entry = report.setdefault(category, {})
            entry["feedback"] = entry.get("feedback", 0) + 1
            entry["rejected_when_sent"] = entry.get("rejected_when_sent", 0) + int(bool(sidecar.get("is_anomaly")))
            entry["rejected_now"] = entry.get("rejected_now", 0) + int(result.is_anomaly)
            split = manifest["split"].get(str(image.relative_to(root)), "?")
            entry[f"in_{split}"] = entry.get(f"in_{split}", 0) + 1
    return report


def false_reject_table(report: dict) -> str:
    lines = [
        "| category | test FRR before | test FRR after | feedback images | rejected when sent | rejected now |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    for category, e in sorted(report.items()):
        lines.append(
            f"| {category} | {pct(e.get('test_frr_before'))} | {pct(e.get('test_frr_after'))} | {e.get('feedback', 0)} "
            f"| {e.get('rejected_when_sent', '-')} | {e.get('rejected_now', '-')} |"
        )
    return (
        "False rejects at the calibrated thresholds. Test FRR: share of the test normals rejected. Feedback images "
        "land in the train or val split like any new normal (val ones are held out for calibration), so "
        "'rejected now' is mostly measured on images the model trained on.\n\n" + "\n".join(lines)
    )


if __name__ == "__main__":
    retrain()
