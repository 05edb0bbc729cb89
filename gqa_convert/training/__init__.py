"""Uptraining: the shared training loop and losses (loop.py), memory and time estimates
(costs.py), keeping emulated K/V heads tied (tying.py), and `uptrain()` (uptrainer.py)."""

from .uptrainer import StepInfo, UptrainOptions, UptrainReport, uptrain

__all__ = ["StepInfo", "UptrainOptions", "UptrainReport", "uptrain"]
