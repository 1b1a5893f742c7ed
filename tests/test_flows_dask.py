"""Sharded feature extraction on a local 2-process Dask cluster equals the single-process cache."""

import json

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_params
from vqflow import stages


def test_dask_shards_merge_into_the_same_cache(tmp_path):
    from flows.features import features_on_dask

    params = tiny_params(tmp_path)
    params["features"]["shard_size"] = 6
    stages.generate(params)
    stages.prepare(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torch.set_num_threads(1)  # the same threads as each Dask worker
    single = stages.features(params)
    reference = {name: load_file(str(tmp_path / "data/features" / name)) for name in single["shards"]}
    (tmp_path / "data/features/index.json").unlink()
    for name in single["shards"]:
        (tmp_path / "data/features" / name).unlink()
    distributed = features_on_dask(str(tmp_path))
    assert distributed == single and len(single["shards"]) >= 4
    for name, tensors in reference.items():
        other = load_file(str(tmp_path / "data/features" / name))
        for key, value in tensors.items():
            torch.testing.assert_close(other[key], value, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "data/features/index.json").read_text())["key"] == single["key"]
