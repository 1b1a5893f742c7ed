"""The retrain inbox: a local folder, or an fsspec URL (``s3://bucket/prefix``) that the flow mirrors into a local
staging folder for the run. Images leave the inbox (with their feedback sidecars) only when the flow says so:
after landing, or into the quarantine. The staging folder is refilled from the store at every run, so a run
killed anywhere leaves the store as the one truth."""

from __future__ import annotations

import shutil
from pathlib import Path

from vqflow.feedback import SIDECAR, filesystem, read_sidecar
from vqflow.validation.inbox import inbox_samples

STAGING = "data/staged-inbox"  # git-ignored: the local mirror of a remote inbox


def is_remote(location: str) -> bool:
    return "://" in location


def local_inbox(root: Path, location: str) -> Path:
    """The folder the flow reads: the inbox itself, or the staging mirror of a remote one."""
    return root / STAGING if is_remote(location) else root / location


def fetch(root: Path, location: str) -> Path:
    """Mirror a remote inbox's ``<category>/<image>`` objects (and sidecars) into the staging folder; returns the
    folder to read. A local inbox is read in place."""
    folder = local_inbox(root, location)
    if not is_remote(location):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    fs, base = filesystem(location.rstrip("/"))
    for path in fs.find(base):
        relative = path[len(base) :].lstrip("/")
        if relative.count("/") != 1:  # only <category>/<file>, as in a local inbox
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        partial.write_bytes(fs.cat_file(path))
        partial.replace(target)
    return folder


def remote_path(root: Path, location: str, local: Path) -> str:
    """The store's URL of a staged image."""
    return f"{location.rstrip('/')}/{local.relative_to(local_inbox(root, location)).as_posix()}"


def remove(root: Path, location: str, image: Path) -> None:
    """Take an image and its sidecar out of the inbox (the store's objects too, for a remote inbox)."""
    for path in (image, image.with_name(image.name + SIDECAR)):
        path.unlink(missing_ok=True)
    if is_remote(location):
        fs, path = filesystem(remote_path(root, location, image))
        for key in (path, path + SIDECAR):
            if fs.exists(key):
                fs.rm(key)


def quarantine_folder(root: Path, location: str, folder: str | None) -> str:
    """``folder``, or ``quarantine`` beside the inbox (a local folder beside the staging one for a remote inbox,
    where the flow's checkout is)."""
    return folder or str(local_inbox(root, location).parent / "quarantine")


def waiting(root: Path, location: str) -> list[Path]:
    """The inbox images, in a stable order."""
    return [Path(s.path) for s in inbox_samples(local_inbox(root, location))]


def capped(images: list[str], per_category: int) -> tuple[list[str], list[str]]:
    """At most ``per_category`` images of each category, oldest feedback first (then by name); returns (taken,
    left for a later run). 0 = no cap."""
    if per_category <= 0:
        return list(images), []

    def arrival(path: str) -> tuple[str, str]:
        sidecar = read_sidecar(path) or {}
        return str(sidecar.get("received_at", "")), Path(path).name

    taken, left, counts = [], [], {}
    for path in sorted(images, key=arrival):
        category = Path(path).parent.name
        counts[category] = counts.get(category, 0) + 1
        (taken if counts[category] <= per_category else left).append(path)
    return sorted(taken), sorted(left)


def from_feedback(images: list[str]) -> list[str]:
    """The images that came in through /feedback or `vqflow feedback` (they have a sidecar)."""
    return [path for path in images if (read_sidecar(path) or {}).get("source") == "feedback"]
