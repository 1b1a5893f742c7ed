"""What several stages read the same way: the manifest, the feature cache and its backbone spec."""

from __future__ import annotations

from ..config import section


def backbone_spec(params: dict):
    from ..features import BackboneSpec

    return BackboneSpec.from_params(section(params, "features", ("backbone", "image_size")))


def manifest_and_cache(params: dict):
    """The manifest and the feature cache of its images."""
    from ..data.manifest import read_manifest
    from ..features import FeatureCache

    manifest = read_manifest(section(params, "prepare", ("manifest",))["manifest"])
    return manifest, FeatureCache(section(params, "features", ("cache",))["cache"], backbone_spec(params), manifest)


def channels(cache) -> list[int]:
    """The channel count of each level of the cached feature pyramid."""
    first = cache.get([next(iter(cache.index["entries"]))])
    return [int(f.shape[1]) for f in first]
