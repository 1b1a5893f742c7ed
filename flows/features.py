"""Scale-out of the features stage: manifest shards mapped as Prefect tasks over a Dask cluster.

Each shard is written by `vqflow.features.extract_shard` (the function the single-process stage uses), and
`write_index` merges them into the same cache a single run writes.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect_dask import DaskTaskRunner

from vqflow.config import load_params
from vqflow.data.manifest import manifest_hash, read_manifest
from vqflow.features import BackboneSpec, extract_shard, shard_ranges, write_index


@task(retries=1, task_run_name="shard-{shard}")
def extract(
    manifest_path: str, spec: BackboneSpec, out_dir: str, shard: int, shard_size: int, batch_size: int, threads: int
) -> str:
    import torch

    torch.set_num_threads(threads)  # several workers share the cores
    return str(extract_shard(read_manifest(manifest_path), spec, out_dir, shard, shard_size, batch_size))


def sharded_features(repo: str = ".", threads_per_worker: int = 1) -> dict:
    """Extract every shard as a mapped task (whatever task runner the calling flow uses), then merge."""
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    manifest_path = str(root / params["prepare"]["manifest"])
    p = params["features"]
    spec = BackboneSpec.from_params(p)
    shard_size, out_dir = int(p.get("shard_size", 64)), str(root / p["cache"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path)
    shards = list(range(len(shard_ranges(len(manifest), shard_size))))
    futures = extract.map(
        manifest_path, spec, out_dir, shards, shard_size, int(p.get("batch_size", 16)), threads_per_worker
    )
    futures.wait()
    for future in futures:
        future.result()
    return write_index(manifest, spec, manifest_hash(manifest_path), out_dir, shard_size)


@flow(
    name="vqflow-features-dask",
    task_runner=DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    ),
)
def features_on_dask(repo: str = ".") -> dict:
    """The features stage on a local 2-process Dask cluster (pass `address=` in DaskTaskRunner for a real one)."""
    return sharded_features(repo)
