"""params.yaml loading with errors that name the missing field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
