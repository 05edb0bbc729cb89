"""gqa-convert: turn multi-head-attention checkpoints into grouped-query (GQA) or
multi-query (MQA) ones, as in Ainslie et al. 2023 (arXiv 2305.13245).

The library API is what the CLI calls; batch scripts and notebooks import it directly:

    from gqa_convert import convert
    report = convert("path/to/llama", 8, method="mean")
"""

__version__ = "0.1.0"

from .converter import ConvertReport, convert  # noqa: E402
from .errors import CheckFailed, ConversionError  # noqa: E402
from .io.source import open_source  # noqa: E402
from .plan import build_plan, valid_groups  # noqa: E402
from .uptrainer import UptrainOptions, UptrainReport, uptrain  # noqa: E402
from .verifier import VerifyReport, verify  # noqa: E402

__all__ = [
    "__version__",
    "CheckFailed",
    "ConversionError",
    "ConvertReport",
    "build_plan",
    "convert",
    "open_source",
    "uptrain",
    "UptrainOptions",
    "UptrainReport",
    "valid_groups",
    "verify",
    "VerifyReport",
]
