"""The model bundle: everything needed to score raw images, in one directory of safetensors and JSON files.

Layout (written by the package stage, read by evaluate, ``vqflow predict``, export and the service)::

    config.json             model name + config, backbone spec, training record
    model.safetensors       the anomaly model's weights
    thresholds.json         per-category image / pixel thresholds (calibrated on held-out normals)
    backbone.safetensors    the frozen feature extractor, batch norms folded (no weights package needed)
    model.onnx              optional: backbone + model + maps + score as one ONNX graph (serve.runtime: onnx)

No file is ever unpickled. A bundle written before ``backbone.safetensors`` existed still loads: its backbone
is then rebuilt from the spec's weight source, which must be available on the machine. This module is the one
reader and writer of these files; vqflow/weights.py writes and reads a model on its own (config + weights).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .backbones import FeaturePyramid
from .features import BackboneSpec
from .io import atomic_dir, read_json
from .models import AnomalyModel
from .weights import CONFIG, WEIGHTS, cpu_tensors, load_model, write_model_files

THRESHOLDS, BACKBONE, ONNX = "thresholds.json", "backbone.safetensors", "model.onnx"


class ModelBundle:
    """A saved model directory: ``ModelBundle(path).predictor_parts(device)`` gives what inference needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for needed in (CONFIG, WEIGHTS, THRESHOLDS):
            if not (self.path / needed).is_file():
                raise FileNotFoundError(
                    f"{self.path / needed}: missing, {self.path} is not a trained vqflow model (run the train stage)"
                )

    @cached_property
    def meta(self) -> dict[str, Any]:
        return read_json(self.path / CONFIG)

    @cached_property
    def thresholds(self) -> dict[str, Any]:
        return read_json(self.path / THRESHOLDS)

    @property
    def spec(self) -> BackboneSpec:
        return BackboneSpec(**self.meta["backbone"])

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX

    def add_onnx(self) -> Path:
        """Export this bundle's model and backbone to ``model.onnx`` (checked against torch), atomically."""
        from .io import atomic_path
        from .onnx_graph import export_onnx

        with atomic_path(self.onnx_path) as tmp:
            export_onnx(self.load_backbone(), self.load_model(), tmp, self.spec.image_size)
        return self.onnx_path

    @property
    def has_backbone(self) -> bool:
        return (self.path / BACKBONE).is_file()

    def load_model(self, device: str | torch.device = "cpu") -> AnomalyModel:
        return load_model(self.path, device)[0]

    def load_backbone(self, device: str | torch.device = "cpu") -> FeaturePyramid:
        """The bundled extractor (architecture from timm, weights from the bundle); the spec's source otherwise."""
        if not self.has_backbone:
            return self.spec.build().to(device)
        backbone = FeaturePyramid(self.spec.name, pretrained=False, fuse=True)
        backbone.load_state_dict(load_file(str(self.path / BACKBONE)), strict=True)
        return backbone.to(device)

    def digest(self) -> str:
        """sha256 of the bundle's files (names and bytes): the same model gives the same digest on any machine."""
        sha = hashlib.sha256()
        for name in sorted(p.name for p in self.path.iterdir() if p.is_file()):
            sha.update(name.encode() + b"\0")
            with open(self.path / name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    sha.update(block)
        return sha.hexdigest()

    @staticmethod
    def write(
        path: str | Path,
        model,
        name: str,
        config,
        thresholds: dict,
        backbone: FeaturePyramid,
        extra: dict[str, Any] | None = None,
        onnx: bool = False,
    ) -> "ModelBundle":
        """Write a complete bundle atomically: the directory appears whole or not at all. ``onnx``: with the whole
        inference graph as ``model.onnx``."""
        with atomic_dir(path) as tmp:
            if onnx:
                from .onnx_graph import export_onnx

                export_onnx(backbone, model, tmp / ONNX, config.image_size)
            (tmp / THRESHOLDS).write_text(json.dumps(thresholds, indent=2) + "\n")
            save_file(cpu_tensors(backbone.state_dict()), str(tmp / BACKBONE))
            write_model_files(model, name, config, tmp, extra)
        return ModelBundle(path)
