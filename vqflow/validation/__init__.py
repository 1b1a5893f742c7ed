"""Data validation: the Great Expectations gate in front of training (and in front of new inbox images)."""

from .suite import Failure, ValidationReport, validate_manifest

__all__ = ["Failure", "ValidationReport", "validate_manifest"]
