"""Uptraining: the shared training loop and losses (loop.py), memory and time estimates
(costs.py), keeping emulated K/V heads tied (tying.py), and `uptrain()` (uptrain.py)."""

from .uptrain import StepInfo, UptrainOptions, UptrainReport, uptrain

__all__ = ["StepInfo", "UptrainOptions", "UptrainReport", "uptrain"]
