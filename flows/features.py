"""Scale-out of the features stage: the images the cache lacks, mapped as Prefect tasks over a Dask cluster.

Each task writes its entries with `vqflow.features.extract_entries` (the function the single-process stage
uses), and `write_index` prunes and indexes them into the same cache a single run writes. The cluster is an
existing one when a scheduler address is given (argument, ``features.dask_address`` or ``VQFLOW_DASK_ADDRESS``),
else a local 2-process cluster started for the flow. Workers read the images by absolute path (a shared file
system); they write entries either straight into the cache directory (shared with them) or, with ``storage``
(``features.dask_storage``: an fsspec URL such as ``s3://bucket/prefix``), to that storage, from which the flow
copies them into the cache. ``record=True`` then runs ``dvc commit features`` so ``dvc repro`` does not redo it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
from prefect import flow, task, unmapped
from prefect_dask import DaskTaskRunner

from vqflow.config import load_params
from vqflow.data.manifest import read_manifest
from vqflow.feedback import filesystem
from vqflow.features import BackboneSpec, entry_names, entry_path, extract_entries, missing_rows, write_index


@task(retries=1, task_run_name="entries-{part}")
def extract(
    rows: pd.DataFrame, spec: BackboneSpec, out_dir: str, storage: str, batch_size: int, threads: int, part: int
) -> int:
    import torch

    torch.set_num_threads(threads)  # several workers share the cores
    if not storage:
        return extract_entries(rows, spec, out_dir, batch_size)
    fs, root = filesystem(storage)
    with tempfile.TemporaryDirectory() as local:
        count = extract_entries(rows, spec, local, batch_size)
        for name in entry_names(rows, spec):
            path = entry_path(Path(local), name)
            fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
    return count


def distributed_features(repo: str = ".", storage: str = "", threads_per_worker: int = 1) -> tuple[dict, int]:
    """Extract the missing entries as mapped tasks (whatever task runner the calling flow uses), then index.
    Returns (index, images extracted)."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    p = params["features"]
    spec = BackboneSpec.from_params(p)
    out_dir = root / p["cache"]
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root / params["prepare"]["manifest"])
    todo = missing_rows(manifest, spec, out_dir)
    todo = todo.assign(path=[str(root / path) for path in todo.path])  # workers may run anywhere
    size = int(p.get("images_per_task", 64))
    parts = [todo.iloc[start : start + size] for start in range(0, len(todo), size)]
    futures = extract.map(
        parts,
        unmapped(spec),
        unmapped(str(out_dir)),
        unmapped(storage),
        unmapped(int(p.get("batch_size", 16))),
        unmapped(threads_per_worker),
        list(range(len(parts))),
    )
    futures.wait()
    extracted = sum(future.result() for future in futures)
    if storage:
        fs, remote = filesystem(storage)
        for name in entry_names(todo, spec):
            local = entry_path(out_dir, name)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{remote}/{local.relative_to(out_dir).as_posix()}", str(local))
    return write_index(manifest, spec, out_dir), extracted


def dask_runner(address: str | None) -> DaskTaskRunner:
    """An existing cluster's runner when ``address`` is given, else a local 2-process cluster's."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )


@flow(name="vqflow-features-dask")
def _features_flow(repo: str, storage: str, record: bool) -> dict:
    index, _ = distributed_features(repo, storage)
    if record:  # dvc.lock learns the cache this flow made, so `dvc repro` does not make it again
        subprocess.run(["dvc", "commit", "--force", "features"], cwd=repo, check=True)
    return index


def features_on_dask(repo: str = ".", address: str | None = None, storage: str | None = None, record: bool = False):
    """The features stage on a Dask cluster (see the module docstring for the scheduler and the storage)."""
    p = load_params(Path(repo) / "params.yaml")["features"]
    address = address or p.get("dask_address") or os.environ.get("VQFLOW_DASK_ADDRESS")
    storage = storage or p.get("dask_storage") or ""
    return _features_flow.with_options(task_runner=dask_runner(address))(repo, storage, record)
