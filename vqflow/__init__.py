"""vqflow: multi-class industrial visual anomaly detection with VQ-Flow, as a reproducible pipeline."""

__version__ = "0.1.0"
