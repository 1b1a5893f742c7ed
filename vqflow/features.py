"""The feature cache: the backbone pyramid of every manifest image, content-addressed.

Layout of a cache directory::

    index.json                      backbone, its key, and image_id -> entry for the current manifest
    objects/ab/ab12...ef.safetensors  tensors "stage0".."stage3" (C, H, W) of one image

An entry is named by the sha256 of the image file (from the manifest) together with the backbone, its weights,
the image size and the preprocessing version, so an image keeps its entry whatever its row in the manifest:
adding N images extracts N, a removed image's entry is deleted, and DVC stores and pushes only new files.
``extract_entries`` computes any subset, so an orchestrator can map it over workers; ``write_index`` prunes
and indexes, giving the same cache a single run writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .backbones import FeaturePyramid, resolve_device
from .data.images import image_to_array, load_image
from .io import atomic_path, read_json, write_json

PREPROCESS_VERSION = 1  # bump whenever load_batch changes what the backbone sees: every entry is recomputed


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

    @property
    def key(self) -> str:
        text = json.dumps({"backbone": asdict(self), "preprocess": PREPROCESS_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_names(manifest: pd.DataFrame, spec: BackboneSpec) -> pd.Series:
    """The cache entry of every manifest row (indexed like the manifest): image content + extractor."""
    empty = manifest.sha256.fillna("").astype(str).str.len() != 64
    if empty.any():
        row = manifest[empty].iloc[0]
        raise ValueError(f"manifest row {row.image_id} ({row.path}): no sha256 of the image; re-run `vqflow prepare`")
    return manifest.sha256.map(lambda sha: hashlib.sha256(f"{spec.key}:{sha}".encode()).hexdigest()[:32])


def entry_path(root: Path, name: str) -> Path:
    return root / "objects" / name[:2] / f"{name}.safetensors"


def load_batch(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """Images as a float tensor (B, 3, S, S) in [0, 1]: the one preprocessing every path shares."""
    return torch.from_numpy(np.stack([image_to_array(load_image(p), image_size) for p in paths]))


def missing_rows(manifest: pd.DataFrame, spec: BackboneSpec, out_dir: str | Path) -> pd.DataFrame:
    """The manifest rows whose entry is not in the cache yet, one row per entry, in manifest order."""
    names = entry_names(manifest, spec)
    todo = manifest.assign(entry=names).drop_duplicates("entry")
    return todo[[not entry_path(Path(out_dir), name).is_file() for name in todo.entry]]


@torch.inference_mode()
def extract_entries(
    rows: pd.DataFrame,
    spec: BackboneSpec,
    out_dir: str | Path,
    batch_size: int = 16,
    device: str = "auto",
    backbone: FeaturePyramid | None = None,
    progress: bool = False,
) -> int:
    """Compute and write the entries of ``rows`` (each file written atomically). Returns how many."""
    out_dir = Path(out_dir)
    names = entry_names(rows, spec).tolist()
    dev = resolve_device(device)
    backbone = (backbone or spec.build()).to(dev)
    batches = range(0, len(rows), batch_size)
    for b in tqdm(batches, desc="features", disable=not progress, unit="batch"):
        images = load_batch(rows["path"].iloc[b : b + batch_size].tolist(), spec.image_size).to(dev)
        pyramid = [f.float().cpu() for f in backbone(images)]
        for i, name in enumerate(names[b : b + batch_size]):
            tensors = {f"stage{k}": f[i].contiguous() for k, f in enumerate(pyramid)}
            with atomic_path(entry_path(out_dir, name)) as tmp:
                save_file(tensors, str(tmp), metadata={"image_sha256": rows["sha256"].iloc[b + i]})
    return len(rows)


def write_index(manifest: pd.DataFrame, spec: BackboneSpec, out_dir: str | Path) -> dict:
    """Index the entries of ``manifest`` (every one must exist) and delete entries no manifest row uses."""
    out_dir = Path(out_dir)
    names = entry_names(manifest, spec)
    absent = [name for name in names if not entry_path(out_dir, name).is_file()]
    if absent:
        raise FileNotFoundError(f"{out_dir}: {len(absent)} images have no cache entry, e.g. {absent[0]}")
    used = set(names)
    for path in (out_dir / "objects").glob("*/*.safetensors"):
        if path.stem not in used:
            path.unlink()
    for legacy in out_dir.glob("shard-*.safetensors"):  # the layout before content addressing
        legacy.unlink()
    entries = dict(zip(manifest.image_id, names))
    content = json.dumps([spec.key, list(entries.items())])
    index = {
        "key": hashlib.sha256(content.encode()).hexdigest()[:16],
        "backbone": asdict(spec),
        "backbone_key": spec.key,
        "preprocess_version": PREPROCESS_VERSION,
        "entries": entries,
    }
    write_json(out_dir / "index.json", index)
    return index


def extract_features(
    manifest: pd.DataFrame,
    spec: BackboneSpec,
    out_dir: str | Path,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> tuple[dict, int]:
    """Extract the entries the cache lacks in this process, then index. Returns (index, images extracted)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = missing_rows(manifest, spec, out_dir)
    if len(todo):
        extract_entries(todo, spec, out_dir, batch_size, device, spec.build(), progress)
    return write_index(manifest, spec, out_dir), len(todo)


class FeatureCache:
    """Read access to a cache directory, checked against the expected backbone and manifest.

    Nothing is kept in memory between calls: each ``get`` reads the entries it needs, so training and scoring
    stream over a cache of any size.
    """

    def __init__(self, path: str | Path, spec: BackboneSpec | None = None, manifest: pd.DataFrame | None = None):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no feature cache (run `vqflow features` first)")
        self.index = read_json(index_path)
        if "backbone_key" not in self.index:
            raise ValueError(f"{self.path}: a feature cache of an older layout; re-run `vqflow features`")
        self.spec = BackboneSpec(**self.index["backbone"])
        if spec is not None and spec != self.spec:
            raise ValueError(
                f"{self.path}: the feature cache was made for another backbone ({self.spec}); re-run features"
            )
        if manifest is not None:
            expected = dict(zip(manifest.image_id, entry_names(manifest, self.spec)))
            if expected != self.index["entries"]:
                raise ValueError(f"{self.path}: the feature cache was made for another manifest; re-run features")

    def get(self, image_ids: Sequence[str]) -> list[torch.Tensor]:
        """The pyramid of the given images, stacked: a list of (N, C, H, W) tensors, one per stage."""
        picked = []
        for image_id in image_ids:
            if image_id not in self.index["entries"]:
                raise KeyError(f"image {image_id} is not in the feature cache {self.path}")
            path = entry_path(self.path, self.index["entries"][image_id])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: cache entry of image {image_id} is missing; re-run features")
            tensors = load_file(str(path))
            picked.append([tensors[f"stage{k}"] for k in range(len(tensors))])
        return [torch.stack([p[k] for p in picked]) for k in range(len(picked[0]))]


class CachedFeatures:
    """Cached images by position, for training (a ``train.FeatureSet``): each batch is read when it is needed."""

    def __init__(self, cache: FeatureCache, image_ids: Sequence[str]):
        self.cache, self.image_ids = cache, list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return self.cache.get([self.image_ids[i] for i in indices])
