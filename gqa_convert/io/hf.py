"""Loading a checkpoint as a transformers model or tokenizer, for the commands that must run
it (verify, calibration, uptrain). The Auto class comes from the family table; custom code
(`auto_map`) is refused unless the user trusts it; a load that leaves weights missing or
unused is refused, since it would measure a different model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..architectures import Family
from ..errors import CheckFailed, ConversionError, first_line
from .paths import refuse_special_files

# Every spelling of a floating dtype that users and configs write.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def config_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a config says its weights are in (float32 when it does not say)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return TORCH_DTYPES.get(str(name), torch.float32)


def check_device(device: str) -> str:
    """A device string that torch understands and this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConversionError(f"--device {device[:40]!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConversionError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConversionError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif parsed.type != "cpu":
        raise ConversionError(f"--device {device}: gqa-convert runs on cpu or cuda")
    return device


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would drown ours; our checks report what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _asks_for_code(path: Path) -> bool:
    try:
        import json

        if not path.is_file() or path.stat().st_size > 16 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and bool(data.get("auto_map"))


def refuse_remote_code(config: dict[str, Any], root: Path, trust_remote_code: bool) -> None:
    """Refuse a checkpoint whose config or tokenizer config names custom code, unless trusted."""
    if trust_remote_code:
        return
    if config.get("auto_map"):
        what = "config.json asks for custom model code (auto_map)"
    elif _asks_for_code(root / "tokenizer_config.json"):
        what = "tokenizer_config.json asks for a custom tokenizer class (auto_map)"
    else:
        return
    raise ConversionError(
        f"{root}: {what}; running it would execute that code. Pass --trust-remote-code only if you "
        "trust where this checkpoint came from."
    )


def load_model(
    root: Path, family: Family, dtype: torch.dtype, device: str, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The family's Auto class, refusing a load that left weights missing or unused."""
    import transformers

    quiet_transformers()
    refuse_special_files(root)
    auto = getattr(transformers, family.auto_class)
    try:
        model, info = auto.from_pretrained(
            root, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    except RecursionError:
        raise CheckFailed(f"{root}: a file it reads is nested too deeply") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckFailed(f"{root}: does not load with {family.auto_class}: {first_line(e, 300)}") from None
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    problems = missing or info.get("unexpected_keys") or info.get("mismatched_keys")
    if problems:
        raise CheckFailed(
            f"{root}: loads with {family.auto_class} but weights do not fit: {sorted(map(str, problems))[:3]}"
        )
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.txt")


def load_tokenizer(root: Path, trust_remote_code: bool = False, *, why: str = "to read text"):
    """The checkpoint's own tokenizer, or one clear error when it has none."""
    from transformers import AutoTokenizer

    quiet_transformers()
    refuse_special_files(root)
    if not any((root / name).is_file() for name in TOKENIZER_FILES) and not (root / "tokenizer_config.json").is_file():
        raise ConversionError(
            f"{root}: has no tokenizer files (tokenizer.json, tokenizer.model, ...), needed {why}; "
            "copy the tokenizer of the original model into it."
        )
    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code)
    except RecursionError:
        raise ConversionError(f"{root}: its tokenizer files are nested too deeply to read; needed {why}.") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        first = first_line(e)
        raise ConversionError(f"{root}: its tokenizer does not load ({first}); needed {why}.") from None
