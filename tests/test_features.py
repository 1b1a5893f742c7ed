import json

import pytest
import torch

from vqflow.data.manifest import build_manifest
from vqflow.data.mvtec import read_mvtec
from vqflow.features import BackboneSpec, FeatureCache, extract_features, extract_shard, load_batch, write_index


@pytest.fixture(scope="module")
def manifest(tiny_dataset):
    return build_manifest(read_mvtec(tiny_dataset), 0.2, 0, progress=False)


SPEC = BackboneSpec("tf_efficientnet_lite0", "packaged", True, 64)


def test_cache_equals_a_direct_backbone_pass(manifest, tmp_path):
    index = extract_features(manifest, SPEC, "m1", tmp_path / "cache", shard_size=7, batch_size=3, progress=False)
    assert len(index["entries"]) == len(manifest) and len(index["shards"]) == 4
    cache = FeatureCache(tmp_path / "cache", SPEC, "m1")
    ids = manifest.image_id.tolist()[5:12]
    cached = cache.get(ids)
    direct = SPEC.build()(load_batch(manifest.path.tolist()[5:12], 64))
    assert [tuple(c.shape) for c in cached] == [(7, 24, 16, 16), (7, 40, 8, 8), (7, 112, 4, 4), (7, 320, 2, 2)]
    for c, d in zip(cached, direct):
        torch.testing.assert_close(c, d, atol=2e-4, rtol=1e-3)  # batch size changes the kernels


def test_stale_cache_is_refused(manifest, tmp_path):
    extract_features(manifest, SPEC, "m1", tmp_path / "cache", shard_size=16, progress=False)
    with pytest.raises(ValueError, match="another backbone or manifest"):
        FeatureCache(tmp_path / "cache", SPEC, "m2")
    with pytest.raises(FileNotFoundError, match="run `vqflow features`"):
        FeatureCache(tmp_path / "nothing")


def test_shards_written_separately_merge_into_the_same_cache(manifest, tmp_path):
    whole = extract_features(manifest, SPEC, "m1", tmp_path / "whole", shard_size=10, progress=False)
    for shard in reversed(range(3)):
        extract_shard(manifest, SPEC, tmp_path / "parts", shard, 10)
    merged = write_index(manifest, SPEC, "m1", tmp_path / "parts", 10)
    assert merged == whole
    for name in whole["shards"]:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()
    shutil_index = json.loads((tmp_path / "parts" / "index.json").read_text())
    assert shutil_index["key"] == whole["key"]
