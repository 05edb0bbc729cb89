"""gqa-convert: turn multi-head-attention checkpoints into grouped-query (GQA) or
multi-query (MQA) ones, as in Ainslie et al. 2023 (arXiv 2305.13245).

The library API is what the CLI calls; batch scripts and notebooks import it directly:

    from gqa_convert import convert
    report = convert("path/to/llama", 8, method="mean")

The package follows the pipeline: architectures/ (the family table), io/ (checkpoints on
disk), data/ (text and tokens), methods/ (K/V heads -> groups), conversion/, evaluation/,
training/, then batch.py, demo/ and cli/ on top.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# The API, imported on first use: `import gqa_convert.cli` (or any one submodule) does not
# pay for torch and the whole pipeline before it needs them.
_API = {
    "valid_groups": "architectures",
    "BatchReport": "batch",
    "run_batch": "batch",
    "ConvertReport": "conversion",
    "build_plan": "conversion",
    "convert": "conversion",
    "CheckFailed": "errors",
    "ConversionError": "errors",
    "InspectReport": "evaluation",
    "VerifyReport": "evaluation",
    "inspect_model": "evaluation",
    "verify": "evaluation",
    "open_source": "io.source",
    "Manifest": "manifest",
    "UptrainOptions": "training",
    "UptrainReport": "training",
    "uptrain": "training",
}

if TYPE_CHECKING:
    from .architectures import valid_groups
    from .batch import BatchReport, run_batch
    from .conversion import ConvertReport, build_plan, convert
    from .errors import CheckFailed, ConversionError
    from .evaluation import InspectReport, VerifyReport, inspect_model, verify
    from .io.source import open_source
    from .manifest import Manifest
    from .training import UptrainOptions, UptrainReport, uptrain


def __getattr__(name: str):  # noqa: ANN202
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("." + _API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


__all__ = [
    "__version__",
    "BatchReport",
    "CheckFailed",
    "ConversionError",
    "ConvertReport",
    "InspectReport",
    "Manifest",
    "UptrainOptions",
    "UptrainReport",
    "VerifyReport",
    "build_plan",
    "convert",
    "inspect_model",
    "open_source",
    "run_batch",
    "uptrain",
    "valid_groups",
    "verify",
]
