"""Data validation: the Great Expectations gate in front of training (and in front of new inbox images)."""

from .inbox import InboxVerdict, validate_inbox
from .suite import Failure, ValidationReport, validate_manifest

__all__ = ["Failure", "InboxVerdict", "ValidationReport", "validate_inbox", "validate_manifest"]
