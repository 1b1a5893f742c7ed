"""A trained model on its own: its config and weights (``config.json`` + ``model.safetensors``), no pickle.

The train stage writes these; the package stage puts them into the model bundle (vqflow/bundle.py) with the
thresholds, the backbone and the ONNX graph.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_dir, read_json
from .models import AnomalyModel
from .models.registry import create_model, saved_config

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_model_files(model: AnomalyModel, name: str, config, directory: Path, extra: dict[str, Any] | None) -> None:
    """``model.safetensors`` + ``config.json`` (name, config and ``extra``) into an existing ``directory``."""
    save_file(cpu_tensors(model.state_dict()), str(directory / WEIGHTS))
    meta = {"model": name, "config": dataclasses.asdict(config), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def save_model(model: AnomalyModel, name: str, config, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the model's files into ``path`` atomically: the directory appears whole or not at all."""
    with atomic_dir(path) as tmp:
        write_model_files(model, name, config, tmp, extra)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[AnomalyModel, dict[str, Any]]:
    """Rebuild a saved model from its config and load its weights strictly. Returns (model, config.json)."""
    path = Path(path)
    for needed in (CONFIG, WEIGHTS):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path / needed}: not a saved vqflow model")
    meta = read_json(path / CONFIG)
    model = create_model(meta["model"], saved_config(meta["model"], meta["config"]))
    model.load_state_dict(load_file(str(path / WEIGHTS), device=str(device)), strict=True)
    return model.to(device).eval(), meta
