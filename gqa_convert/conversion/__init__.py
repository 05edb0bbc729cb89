"""Conversion, in pipeline order: the plan from headers (plan.py), calibration (calibrate.py),
one block's math (layer.py), the streaming writer (stream.py), and `convert()` (converter.py)."""

from .converter import ConvertReport, convert
from .plan import ConversionPlan, build_plan

__all__ = ["ConversionPlan", "ConvertReport", "build_plan", "convert"]
