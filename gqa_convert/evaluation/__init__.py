"""Evaluation: integrity checks (integrity.py), sliding-window perplexity (perplexity.py),
`verify()` (verifier.py), `inspect_model()` (inspection.py), and plots (plots.py)."""

from .inspection import InspectReport, inspect_model
from .verifier import VerifyReport, verify

__all__ = ["InspectReport", "VerifyReport", "inspect_model", "verify"]
