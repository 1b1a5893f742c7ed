"""Anomaly models: one file per family (vqflow, cflow, vitad, padim), each registering itself in ``registry``.
Saving and loading a trained model is the bundle's job (vqflow/bundle.py)."""

from .base import AnomalyModel, Prediction, StepOutput
from .registry import MODELS, available_models, config_from_params, create_model, make_config, register_model

__all__ = [
    "AnomalyModel",
    "Prediction",
    "StepOutput",
    "MODELS",
    "available_models",
    "register_model",
    "make_config",
    "config_from_params",
    "create_model",
]
