import hashlib

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from vqflow.data.manifest import build_manifest
from vqflow.data.mvtec import read_mvtec
from vqflow.features import (
    BackboneSpec,
    CachedFeatures,
    FeatureCache,
    entry_names,
    entry_path,
    extract_entries,
    extract_features,
    load_batch,
    write_index,
)


@pytest.fixture(scope="module")
def manifest(tiny_dataset):
    return build_manifest(read_mvtec(tiny_dataset), 0.2, 0, progress=False)


SPEC = BackboneSpec("tf_efficientnet_lite0", "packaged", True, 64)


def _entries(root):
    return {path.name: path.read_bytes() for path in (root / "objects").glob("*/*.safetensors")}


def test_cache_equals_a_direct_backbone_pass(manifest, tmp_path):
    index, extracted = extract_features(manifest, SPEC, tmp_path / "cache", batch_size=3, progress=False)
    assert extracted == len(manifest) and len(index["entries"]) == len(manifest)
    assert len(_entries(tmp_path / "cache")) == manifest.sha256.nunique()
    cache = FeatureCache(tmp_path / "cache", SPEC, manifest)
    ids = manifest.image_id.tolist()[5:12]
    cached = cache.get(ids)
    direct = SPEC.build()(load_batch(manifest.path.tolist()[5:12], 64))
    assert [tuple(c.shape) for c in cached] == [(7, 24, 16, 16), (7, 40, 8, 8), (7, 112, 4, 4), (7, 320, 2, 2)]
    for c, d in zip(cached, direct):
        torch.testing.assert_close(c, d, atol=2e-4, rtol=1e-3)  # batch size changes the kernels


def test_stale_or_foreign_cache_is_refused(manifest, tmp_path):
    extract_features(manifest, SPEC, tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="another backbone"):
        FeatureCache(tmp_path / "cache", BackboneSpec("tf_efficientnet_lite0", "packaged", True, 128))
    edited = manifest.copy()
    edited.loc[3, "sha256"] = hashlib.sha256(b"another image").hexdigest()
    with pytest.raises(ValueError, match="another manifest"):
        FeatureCache(tmp_path / "cache", SPEC, edited)
    with pytest.raises(FileNotFoundError, match="run `vqflow features`"):
        FeatureCache(tmp_path / "nothing")
    no_sha = manifest.copy()
    no_sha.loc[2, "sha256"] = ""
    with pytest.raises(ValueError, match=f"row {no_sha.image_id[2]} .*no sha256"):
        extract_features(no_sha, SPEC, tmp_path / "other", progress=False)


def test_adding_images_extracts_only_them_and_removing_prunes(manifest, tmp_path):
    fresh, _ = extract_features(manifest, SPEC, tmp_path / "fresh", progress=False)
    added = manifest.sample(frac=1, random_state=0).index[:10]
    # the smaller manifest numbers its rows differently: ids are positions, entries follow the content
    smaller = manifest.drop(added).reset_index(drop=True).assign(image_id=lambda f: [f"{i:06d}" for i in range(len(f))])
    _, extracted = extract_features(smaller, SPEC, tmp_path / "grown", progress=False)
    assert extracted == len(smaller)
    before = _entries(tmp_path / "grown")
    index, extracted = extract_features(manifest, SPEC, tmp_path / "grown", progress=False)
    assert extracted == 10 and len(smaller) >= 10
    after = _entries(tmp_path / "grown")
    assert all(after[name] == data for name, data in before.items())  # untouched
    assert index == fresh and set(after) == set(_entries(tmp_path / "fresh"))
    grown = FeatureCache(tmp_path / "grown", SPEC, manifest).get(manifest.image_id.tolist())
    for g, f in zip(grown, FeatureCache(tmp_path / "fresh", SPEC, manifest).get(manifest.image_id.tolist())):
        torch.testing.assert_close(g, f, atol=2e-4, rtol=1e-3)  # batches were made of other images
    _, extracted = extract_features(smaller, SPEC, tmp_path / "grown", progress=False)
    assert extracted == 0 and set(_entries(tmp_path / "grown")) == set(before)  # removed images dropped out


def test_entries_written_separately_index_into_the_same_cache(manifest, tmp_path):
    whole, _ = extract_features(manifest, SPEC, tmp_path / "whole", batch_size=4, progress=False)
    for start in reversed(range(0, len(manifest), 8)):  # parts aligned with the batches: same kernels
        extract_entries(manifest.iloc[start : start + 8], SPEC, tmp_path / "parts", batch_size=4)
    assert write_index(manifest, SPEC, tmp_path / "parts") == whole
    assert _entries(tmp_path / "parts") == _entries(tmp_path / "whole")
    (tmp_path / "parts" / "index.json").unlink()
    entry_path(tmp_path / "parts", entry_names(manifest, SPEC).iloc[4]).unlink()
    with pytest.raises(FileNotFoundError, match="1 images have no cache entry"):
        write_index(manifest, SPEC, tmp_path / "parts")


def write_cache(root, tensors: list[torch.Tensor]) -> tuple[FeatureCache, list[str]]:
    """A cache holding given per-stage tensors as if the backbone had made them (one fake image per row)."""
    count = len(tensors[0])
    frame = pd.DataFrame(
        {
            "image_id": [f"{i:06d}" for i in range(count)],
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)],
        }
    )
    for row, name in enumerate(entry_names(frame, SPEC)):
        path = entry_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"stage{k}": t[row].contiguous() for k, t in enumerate(tensors)}, str(path))
    write_index(frame, SPEC, root)
    return FeatureCache(root, SPEC, frame), frame.image_id.tolist()


def test_cached_features_read_what_was_written(tmp_path):
    tensors = [torch.randn(5, c, s, s) for c, s in ((3, 8), (4, 4))]
    cache, ids = write_cache(tmp_path, tensors)
    picked = CachedFeatures(cache, ids).__getitems__([4, 0, 2])
    for p, t in zip(picked, tensors):
        assert torch.equal(p, t[[4, 0, 2]])
