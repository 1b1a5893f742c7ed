"""The feature cache: the backbone pyramid of every manifest image, computed once.

Layout of a cache directory::

    index.json          key, backbone, image size, manifest hash, shard list, image_id -> (shard, row)
    shard-00000.safetensors   tensors "stage0".."stage3" of shape (N, C, H, W) for up to shard_size images

The key hashes backbone, weights, image size and manifest, so a stage that reads the cache can tell a
stale one from the right one. Shards are independent (``extract_shard``) so an orchestrator can map them
over workers and ``write_index`` merges them into the same cache a single run writes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .backbones import FeaturePyramid, resolve_device
from .data.images import image_to_array, load_image
from .io import atomic_path, read_json, write_json


@dataclass(frozen=True)
class BackboneSpec:
    """Which extractor makes the features: what the cache key and every model checkpoint record."""

    name: str = "tf_efficientnet_lite0"
    weights: str = "packaged"
    pretrained: bool = True
    image_size: int = 256

    @classmethod
    def from_params(cls, params: dict) -> "BackboneSpec":
        return cls(
            params["backbone"],
            str(params.get("weights", "packaged")),
            bool(params.get("pretrained", True)),
            int(params["image_size"]),
        )

    def build(self) -> FeaturePyramid:
        return FeaturePyramid(self.name, self.weights, self.pretrained)


def cache_key(spec: BackboneSpec, manifest_sha: str) -> str:
    text = json.dumps({"backbone": asdict(spec), "manifest": manifest_sha}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_batch(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """Images as a float tensor (B, 3, S, S) in [0, 1]: the one preprocessing every path shares."""
    return torch.from_numpy(np.stack([image_to_array(load_image(p), image_size) for p in paths]))


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@torch.inference_mode()
def extract_shard(
    manifest: pd.DataFrame,
    spec: BackboneSpec,
    out_dir: str | Path,
    shard: int,
    shard_size: int,
    batch_size: int = 16,
    device: str = "auto",
    backbone: FeaturePyramid | None = None,
    progress: bool = False,
) -> Path:
    """Compute and write one shard (rows ``shard*shard_size`` onward of the manifest). Atomic."""
    start, stop = shard_ranges(len(manifest), shard_size)[shard]
    rows = manifest.iloc[start:stop]
    dev = resolve_device(device)
    backbone = (backbone or spec.build()).to(dev)
    outputs: list[list[torch.Tensor]] = []
    batches = range(0, len(rows), batch_size)
    for b in tqdm(batches, desc=f"features shard {shard}", disable=not progress, unit="batch"):
        images = load_batch(rows["path"].iloc[b : b + batch_size].tolist(), spec.image_size).to(dev)
        outputs.append([f.float().cpu() for f in backbone(images)])
    tensors = {f"stage{i}": torch.cat([o[i] for o in outputs]).contiguous() for i in range(len(outputs[0]))}
    path = Path(out_dir) / shard_name(shard)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"image_ids": json.dumps(rows["image_id"].tolist())})
    return path


def write_index(
    manifest: pd.DataFrame, spec: BackboneSpec, manifest_sha: str, out_dir: str | Path, shard_size: int
) -> dict:
    """Merge shards into the cache index after checking each one holds the expected images."""
    out_dir = Path(out_dir)
    entries: dict[str, list[int]] = {}
    shards = []
    for shard, (start, stop) in enumerate(shard_ranges(len(manifest), shard_size)):
        path = out_dir / shard_name(shard)
        with safe_open(str(path), framework="pt") as fh:
            ids = json.loads(fh.metadata()["image_ids"])
        expected = manifest["image_id"].iloc[start:stop].tolist()
        if ids != expected:
            raise ValueError(f"{path}: holds images {ids[:3]}..., expected {expected[:3]}... (stale shard)")
        entries.update({image_id: [shard, row] for row, image_id in enumerate(ids)})
        shards.append(path.name)
    index = {
        "key": cache_key(spec, manifest_sha),
        "backbone": asdict(spec),
        "manifest_sha256": manifest_sha,
        "shard_size": shard_size,
        "shards": shards,
        "entries": entries,
    }
    write_json(out_dir / "index.json", index)
    return index


def extract_features(
    manifest: pd.DataFrame,
    spec: BackboneSpec,
    manifest_sha: str,
    out_dir: str | Path,
    shard_size: int = 64,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Extract every shard in this process (reusing shards already present for the same key)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(spec, manifest_sha)
    index_path = out_dir / "index.json"
    if index_path.is_file() and read_json(index_path).get("key") == key:
        return read_json(index_path)
    index_path.unlink(missing_ok=True)
    backbone = spec.build()
    total = math.ceil(len(manifest) / shard_size)
    for shard in tqdm(range(total), desc="features", unit="shard", disable=not progress):
        extract_shard(manifest, spec, out_dir, shard, shard_size, batch_size, device, backbone)
    for stale in out_dir.glob("shard-*.safetensors"):
        if int(stale.stem.split("-")[1]) >= total:
            stale.unlink()
    return write_index(manifest, spec, manifest_sha, out_dir, shard_size)


class FeatureCache:
    """Read access to a cache directory, checked against the expected backbone and manifest."""

    def __init__(self, path: str | Path, spec: BackboneSpec | None = None, manifest_sha: str | None = None):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no feature cache (run `vqflow features` first)")
        self.index = read_json(index_path)
        if spec is not None and manifest_sha is not None and self.index["key"] != cache_key(spec, manifest_sha):
            raise ValueError(
                f"{self.path}: the feature cache was made for another backbone or manifest; re-run features"
            )
        self.spec = BackboneSpec(**self.index["backbone"])
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        if shard not in self._shards:
            self._shards[shard] = load_file(str(self.path / self.index["shards"][shard]))
        return self._shards[shard]

    def get(self, image_ids: Sequence[str]) -> list[torch.Tensor]:
        """The pyramid of the given images, stacked: a list of (N, C, H, W) tensors, one per stage."""
        picked = []
        for image_id in image_ids:
            if image_id not in self.index["entries"]:
                raise KeyError(f"image {image_id} is not in the feature cache {self.path}")
            shard, row = self.index["entries"][image_id]
            tensors = self._shard(shard)
            picked.append([tensors[f"stage{i}"][row] for i in range(len(tensors))])
        return [torch.stack([p[i] for p in picked]) for i in range(len(picked[0]))]
