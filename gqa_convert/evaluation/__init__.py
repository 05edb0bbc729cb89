"""Evaluation: integrity checks (integrity.py), sliding-window perplexity (perplexity.py),
`verify()` (verify.py), `inspect_model()` (inspection.py), and plots (plots.py)."""

from .inspection import InspectReport, inspect_model
from .verify import VerifyReport, verify

__all__ = ["InspectReport", "VerifyReport", "inspect_model", "verify"]
