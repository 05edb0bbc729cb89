"""gqa-convert: turn multi-head-attention checkpoints into grouped-query (GQA) or
multi-query (MQA) ones, as in Ainslie et al. 2023 (arXiv 2305.13245).

The library API is what the CLI calls; batch scripts and notebooks import it directly:

    from gqa_convert import convert
    report = convert("path/to/llama", 8, method="mean")

The package follows the pipeline: architectures/ (the family table), io/ (checkpoints on
disk), data/ (text and tokens), methods/ (K/V heads -> groups), conversion/, evaluation/,
training/, then batch.py, demo/ and cli/ on top.
"""

from ._version import __version__
from .architectures import valid_groups
from .batch import BatchReport, run_batch
from .conversion import ConvertReport, build_plan, convert
from .errors import CheckFailed, ConversionError
from .evaluation import InspectReport, VerifyReport, inspect_model, verify
from .io.source import open_source
from .manifest import Manifest
from .training import UptrainOptions, UptrainReport, uptrain

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
