"""Feature extraction mapped over a local 2-process Dask cluster equals the single-process cache."""

import json

import torch
import yaml

from tests.conftest import tiny_params
from vqflow import stages


def _entries(root):
    return {path.name: path for path in (root / "objects").glob("*/*.safetensors")}


def test_dask_tasks_index_into_the_same_cache(tmp_path):
    from safetensors.torch import load_file

    from flows.features import features_on_dask

    params = tiny_params(tmp_path)
    params["features"].update(images_per_task=6, batch_size=6)  # tasks made of whole batches: the same kernels
    stages.generate(params)
    stages.prepare(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torch.set_num_threads(1)  # the same threads as each Dask worker
    single, _ = stages.features(params)
    cache = tmp_path / "data/features"
    reference = {name: load_file(str(path)) for name, path in _entries(cache).items()}
    (cache / "index.json").unlink()
    for path in _entries(cache).values():
        path.unlink()
    distributed = features_on_dask(str(tmp_path))
    assert distributed == single and len(reference) >= 24
    assert set(_entries(cache)) == set(reference)
    for name, tensors in reference.items():
        other = load_file(str(_entries(cache)[name]))
        for key, value in tensors.items():
            torch.testing.assert_close(other[key], value, atol=1e-6, rtol=0)
    assert json.loads((cache / "index.json").read_text())["key"] == single["key"]
