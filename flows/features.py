"""Scale-out of the features stage: the images the cache lacks, mapped as Prefect tasks over a Dask cluster.

Each task writes its entries with `vqflow.features.extract_entries` (the function the single-process stage
uses), and `write_index` prunes and indexes them into the same cache a single run writes. The cluster is an
existing one when a scheduler address is given (argument, ``features.dask_address`` or ``VQFLOW_DASK_ADDRESS``;
its workers must see the cache directory), else a local 2-process cluster started for the flow.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task, unmapped
from prefect_dask import DaskTaskRunner

from vqflow.config import load_params
from vqflow.data.manifest import read_manifest
from vqflow.features import BackboneSpec, extract_entries, missing_rows, write_index


@task(retries=1, task_run_name="entries-{part}")
def extract(
    manifest_path: str, spec: BackboneSpec, out_dir: str, image_ids: list[str], batch_size: int, threads: int, part: int
) -> int:
    import torch

    torch.set_num_threads(threads)  # several workers share the cores
    manifest = read_manifest(manifest_path)
    return extract_entries(manifest[manifest.image_id.isin(image_ids)], spec, out_dir, batch_size)


def distributed_features(repo: str = ".", threads_per_worker: int = 1) -> dict:
    """Extract the missing entries as mapped tasks (whatever task runner the calling flow uses), then index."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    manifest_path = str(root / params["prepare"]["manifest"])
    p = params["features"]
    spec = BackboneSpec.from_params(p)
    out_dir = str(root / p["cache"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path)
    todo = missing_rows(manifest, spec, out_dir).image_id.tolist()
    size = int(p.get("images_per_task", 64))
    parts = [todo[start : start + size] for start in range(0, len(todo), size)]
    futures = extract.map(
        unmapped(manifest_path),
        unmapped(spec),
        unmapped(out_dir),
        parts,
        unmapped(int(p.get("batch_size", 16))),
        unmapped(threads_per_worker),
        list(range(len(parts))),
    )
    futures.wait()
    for future in futures:
        future.result()
    return write_index(manifest, spec, out_dir)


def dask_runner(address: str | None) -> DaskTaskRunner:
    """An existing cluster's runner when ``address`` is given, else a local 2-process cluster's."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )


@flow(name="vqflow-features-dask")
def _features_flow(repo: str) -> dict:
    return distributed_features(repo)


def features_on_dask(repo: str = ".", address: str | None = None) -> dict:
    """The features stage on a Dask cluster (see the module docstring for how the scheduler is found)."""
    params = load_params(Path(repo) / "params.yaml")
    address = address or params["features"].get("dask_address") or os.environ.get("VQFLOW_DASK_ADDRESS")
    return _features_flow.with_options(task_runner=dask_runner(address))(repo)
