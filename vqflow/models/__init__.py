"""Model registry: a model is one file that registers a name, its config class and a builder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file

from ..io import atomic_dir
from .base import AnomalyModel, Prediction, StepOutput


@dataclass(frozen=True)
class ModelEntry:
    config_class: type
    build: Callable[[Any], AnomalyModel]
    overrides: dict[str, Any]
    section: str  # the params.yaml section ``model.<section>`` this model reads


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_class: type, overrides: dict[str, Any] | None = None, section: str | None = None):
    """Decorator of a builder: ``@register_model("vqflow", VQFlowConfig)``. A variant fixes some config fields
    (``overrides``) and may share another model's params section (``section``)."""

    def wrap(build: Callable[[Any], AnomalyModel]):
        MODELS[name] = ModelEntry(config_class, build, dict(overrides or {}), section or name)
        return build

    return wrap


def _load_builtin_models() -> None:
    from . import cflow, padim, vitad, vqflow  # noqa: F401  (each registers its models)


def available_models() -> list[str]:
    _load_builtin_models()
    return sorted(MODELS)


def _entry(name: str) -> ModelEntry:
    _load_builtin_models()
    if name not in MODELS:
        raise ValueError(f"model.name: unknown model {name!r}; available: {available_models()}")
    return MODELS[name]


def make_config(name: str, values: dict[str, Any], **derived: Any):
    """The config of model ``name`` from field values plus derived fields (channels, image size)."""
    entry = _entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"model.{entry.section}: unknown params {unknown}; known: {sorted(fields - set(derived))}")
    return entry.config_class(**{**values, **derived, **entry.overrides})


def config_from_params(model_params: dict[str, Any], **derived: Any):
    """(name, config) from the ``model`` params section: ``name`` selects the model, ``model.<section>`` its knobs."""
    name = model_params.get("name")
    entry = _entry(name)
    return name, make_config(name, dict(model_params.get(entry.section) or {}), **derived)


def create_model(name: str, config) -> AnomalyModel:
    return _entry(name).build(config)


def save_model(model: AnomalyModel, name: str, config, path: str | Path, extra: dict[str, Any] | None = None,
               files: dict[str, Any] | None = None, tensors: dict[str, dict] | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (+ JSON ``files``, + safetensors ``tensors``) into ``path``
    atomically (no pickle)."""
    with atomic_dir(path) as tmp:
        for filename, content in (files or {}).items():
            (tmp / filename).write_text(json.dumps(content, indent=2) + "\n")
        for filename, state in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / filename))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"model": name, "config": dataclasses.asdict(config), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model(path: str | Path, device: str = "cpu") -> tuple[AnomalyModel, dict[str, Any]]:
    """Rebuild a saved model from its config and load its weights strictly. Returns (model, config.json)."""
    path = Path(path)
    for needed in ("config.json", "model.safetensors"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path / needed}: not a saved vqflow model")
    meta = json.loads((path / "config.json").read_text())
    legacy = getattr(_entry(meta["model"]).config_class, "LEGACY_VALUES", {})  # fields added after it was saved
    config = make_config(meta["model"], {**legacy, **meta["config"]})
    model = create_model(meta["model"], config)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=device), strict=True)
    return model.to(device).eval(), meta


__all__ = ["AnomalyModel", "Prediction", "StepOutput", "MODELS", "available_models", "register_model", "make_config", "config_from_params",
           "create_model",
           "save_model", "load_model"]
