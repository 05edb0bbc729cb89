"""Option values shared by the commands: defaults that more than one command uses, the range
of every numeric option (checked in one place, for the CLI, batch files and the Python API
alike), and sizes such as '5GB'.

An option has one name everywhere: `seq_len` in Python and batch files is `--seq-len` on
the command line, and the same limit applies to it in every command."""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConversionError

DEFAULT_CALIB_TOKENS = 32768
DEFAULT_VERIFY_TOKENS = 16384
# --method refine (chosen once on the held-out slice of the training text; README "refine")
DEFAULT_REFINE_STEPS = 400
DEFAULT_REFINE_LR = 3e-3
DEFAULT_REFINE_TOKENS = 16384
DEFAULT_REFINE_BATCH_TOKENS = 2048
MAX_VERIFY_SEQ_LEN = 1024  # verify's default window: the model's context, at most this
MAX_TRAIN_SEQ_LEN = 2048  # uptrain's and calibration's default sequence: the context, at most this
DEFAULT_MAX_SHARD = "5GB"  # transformers' default shard size


@dataclass(frozen=True)
class Limit:
    """Allowed values of a numeric option: min/max inclusive, above exclusive."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    integer: bool = False


LIMITS: dict[str, Limit] = {
    "groups": Limit(min=1, integer=True),
    "seed": Limit(min=0, integer=True),
    "calib_tokens": Limit(min=2, max=1 << 40, integer=True),
    "max_shard_size": Limit(min=1, integer=True),
    "max_tokens": Limit(min=2, max=1 << 40, integer=True),
    "seq_len": Limit(min=2, max=1 << 24, integer=True),
    "stride": Limit(min=1, integer=True),
    "batch_size": Limit(min=1, max=1 << 20, integer=True),
    "generate": Limit(min=0, max=1 << 20, integer=True),
    "max_ppl_ratio": Limit(above=0),
    "steps": Limit(min=1, integer=True),
    "tokens": Limit(min=1),
    "alpha": Limit(above=0, max=1000),
    "pretrain_tokens": Limit(min=1),
    "lr": Limit(above=0, max=10),
    "warmup": Limit(min=0, integer=True),
    "grad_accum": Limit(min=1, max=1 << 20, integer=True),
    "weight_decay": Limit(min=0, max=10),
    "kd_weight": Limit(min=0, max=1),
    "temperature": Limit(above=0, max=1000),
    "eval_every": Limit(min=1, integer=True),
    "eval_tokens": Limit(min=2, max=1 << 40, integer=True),
    "save_every": Limit(min=1, integer=True),
    "lora_rank": Limit(min=1, max=1 << 16, integer=True),
    "refine_steps": Limit(min=0, max=1 << 20, integer=True),
    "refine_lr": Limit(above=0, max=10),
    "refine_tokens": Limit(min=4, max=1 << 40, integer=True),
    "refine_batch_tokens": Limit(min=1, max=1 << 30, integer=True),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for option `name` (None if nothing, or if it has no limit)."""
    limit = LIMITS.get(name)
    if limit is None or value is None:
        return None
    if name == "max_shard_size" and isinstance(value, str):
        try:
            parse_size(value)
        except ConversionError as e:
            return str(e).removeprefix("--max-shard-size: ")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number (got {_shown(value)})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if limit.integer and not (isinstance(value, int) or float(value).is_integer()):
        return f"must be a whole number (got {value})"
    if limit.min is not None and value < limit.min:
        return f"must be at least {_num(limit.min)} (got {_num(value)})"
    if limit.above is not None and value <= limit.above:
        return f"must be above {_num(limit.above)} (got {_num(value)})"
    if limit.max is not None and value > limit.max:
        return f"must be at most {_num(limit.max)} (got {_num(value)})"
    return None


def check(**values: Any) -> None:
    """Raise ConversionError (exit 2) for the first option outside its range."""
    for name, value in values.items():
        why = problem(name, value)
        if why:
            raise ConversionError(f"{flag(name)} {why}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal, as transformers counts), '2GiB' -> 2**31, '1000' -> 1000."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text)) if isinstance(text, str) and len(text) < 40 else None
        if not m:
            raise ConversionError(
                f"--max-shard-size: {_shown(text)} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes"
            )
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    check(max_shard_size=value)
    return value


def accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON/YAML value fits a type hint (one value stands for a list of one)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path) or hint is os.PathLike or origin is os.PathLike:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(hint) or (Any,)
        items = value if isinstance(value, list) else [value]  # one value for a list of one
        return bool(items) and all(accepts(item, x) for x in items)
    return False


def describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(h) for h in typing.get_args(hint) if h is not type(None)]
        return "|".join(dict.fromkeys(parts))
    if origin in (list, tuple):
        (item, *_) = typing.get_args(hint) or (Any,)
        return f"list[{describe_type(item)}]"
    if hint is os.PathLike or origin is os.PathLike or hint is Path:
        return "str"
    return getattr(hint, "__name__", str(hint))
