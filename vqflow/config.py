"""params.yaml loading with errors that name the missing field, and the service's settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml


class ParamsError(ValueError):
    """params.yaml is missing a field or has a wrong value; the message names the field."""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return params


def section(params: dict[str, Any], name: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """One section of params, checking that the ``required`` keys are present."""
    if name not in params or not isinstance(params[name], dict):
        raise ParamsError(f"params.yaml: missing section '{name}'")
    values = params[name]
    for key in required:
        if key not in values:
            raise ParamsError(f"params.yaml: missing field '{name}.{key}'")
    return values


def train_recipe(train: dict[str, Any], model_name: str | None) -> dict[str, Any]:
    """The ``train`` section with ``train.per_model.<model_name>`` (a model's own recipe) applied over it."""
    recipe = (train.get("per_model") or {}).get(model_name) or {}
    return {**{k: v for k, v in train.items() if k != "per_model"}, **recipe}


SERVE_CHOICES = {"runtime": ("torch", "onnx")}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def _boolean(raw: Any) -> bool:
    """YAML gives a bool, an environment variable a string: ``bool("false")`` would be True."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in TRUE + FALSE:
        raise ValueError(raw)
    return text in TRUE


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings, read by the service and `vqflow predict` from here only: the ``serve`` section of
    params.yaml over these defaults, each field overridden by the environment variable ``VQFLOW_<FIELD>``."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    runtime: str = "torch"  # torch | onnx (the bundle's model.onnx in ONNX Runtime)
    max_batch_size: int = 16  # images scored together (requests share batches)
    max_latency_ms: float = 10.0  # how long a batch waits for more images once it has one
    batch_workers: int = 2  # batches scored at once
    torch_threads: int = 0  # torch (or ONNX Runtime) threads per process; 0 = CPU cores / workers
    max_pixels: int = 40_000_000  # decompression-bomb limit per image (width x height)
    max_upload_bytes: int = 20_000_000
    max_batch_images: int = 64  # images per /predict_batch request
    inbox: str = ""  # /feedback stores confirmed normals here (the retrain inbox: a folder or s3://bucket/prefix)
    review: str = ""  # and images labelled defective here ("": `review` beside the inbox)
    # /feedback writes training data: with an inbox it needs VQFLOW_FEEDBACK_TOKEN, unless this opts in to anyone
    # who reaches the port labelling images (a closed test network only)
    feedback_unauthenticated: bool = False

    @classmethod
    def load(cls, params: dict[str, Any], environ: Mapping[str, str] | None = None) -> "ServeSettings":
        environ = os.environ if environ is None else environ
        given = params.get("serve") or {}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ParamsError(f"params.yaml: unknown field(s) serve.{', serve.'.join(unknown)}; known: {sorted(known)}")
        values = {}
        for name, spec in known.items():
            kind = type(spec.default)
            raw, where = given.get(name, spec.default), f"serve.{name}"
            if f"VQFLOW_{name.upper()}" in environ:
                raw, where = environ[f"VQFLOW_{name.upper()}"], f"VQFLOW_{name.upper()}"
            try:
                values[name] = _boolean(raw) if kind is bool else kind(raw)
            except (TypeError, ValueError) as exc:
                raise ParamsError(f"{where}={raw!r}: expected {kind.__name__}") from exc
            if name in SERVE_CHOICES and values[name] not in SERVE_CHOICES[name]:
                raise ParamsError(f"{where}={raw!r}: expected one of {SERVE_CHOICES[name]}")
        return cls(**values)
