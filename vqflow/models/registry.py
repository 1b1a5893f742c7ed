"""The model registry: each model family file registers a name, its config class and a builder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .base import AnomalyModel


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


def saved_config(name: str, values: dict[str, Any]):
    """The config of a saved model: fields added after it was saved take the value that reproduces it."""
    legacy = getattr(_entry(name).config_class, "LEGACY_VALUES", {})
    return make_config(name, {**legacy, **values})


def config_from_params(model_params: dict[str, Any], **derived: Any):
    """(name, config) from the ``model`` params section: ``name`` selects the model, ``model.<section>`` its knobs."""
    name = model_params.get("name")
    entry = _entry(name)
    return name, make_config(name, dict(model_params.get(entry.section) or {}), **derived)


def create_model(name: str, config) -> AnomalyModel:
    return _entry(name).build(config)
