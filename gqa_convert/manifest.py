"""The manifest (gqa_convert.json) written beside the weights, and the model card (README.md).

`Manifest` is the one owner of the manifest: conversion builds it, uptraining extends it,
verify and batch read it. Reading validates it, so a damaged file is one clear error."""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._version import __version__
from .architectures.kvcache import CONTEXTS, human_bytes
from .errors import ConversionError
from .options import accepts, describe_type

MANIFEST = "gqa_convert.json"
MAX_MANIFEST_BYTES = 16 << 20


@dataclass
class SourceRecord:
    name: str  # the hub id, or the local path
    path: str  # where the files were read from
    hub_id: str | None
    revision: str | None
    format: str  # "safetensors" or "bin"
    files: dict[str, str]  # weight file -> SHA-256


@dataclass
class ConversionRecord:
    family: str
    method: str
    method_summary: str
    seed: int
    n_layers: int
    n_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    grouping_mode: str
    grouping: dict[str, list[list[int]]]  # layer -> the source KV heads of each group
    calibration: dict[str, Any] | None
    keys: str | None
    emulated: bool
    dropped_tensors: list[str]
    notes: list[str] = field(default_factory=list)  # what the conversion changed beyond K/V (e.g. untied lm_head)
    refinement: dict[str, Any] | None = None


@dataclass
class Manifest:
    tool: dict[str, Any] = field(default_factory=lambda: {"name": "gqa-convert", "version": __version__})
    output_name: str | None = None
    source: SourceRecord | None = None
    conversion: ConversionRecord | None = None
    kv_cache: dict[str, Any] | None = None
    output: dict[str, Any] | None = None  # bytes, files (shard -> SHA-256), copied_files
    command: str | None = None
    uptraining: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        conv = d.get("conversion")
        if conv is not None:  # optional records stay out of conversions that have none
            for key in ("notes", "refinement"):
                if not conv[key]:
                    conv.pop(key)
        return d

    def write(self, out_dir: Path) -> None:
        (out_dir / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @property
    def emulated(self) -> bool:
        return bool(self.conversion and self.conversion.emulated)

    @classmethod
    def read(cls, model_dir: Path) -> Manifest | None:
        """The manifest of a checkpoint directory; None when it has none. A file that is there
        but is not a valid manifest is a ConversionError (exit 2)."""
        path = model_dir / MANIFEST
        if not path.exists() and not path.is_symlink():
            return None
        try:
            if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ValueError("not a regular file of sensible size")
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls._from_dict(data)
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as e:
            raise ConversionError(
                f"{path}: not a valid gqa-convert manifest ({str(e)[:120] or type(e).__name__}); "
                "restore it from the conversion, or delete it (verify then needs --reference)."
            ) from None

    @classmethod
    def _from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        known = {f.name for f in fields(cls)}
        m = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("tool", "kv_cache", "output", "uptraining"):
            if getattr(m, name) is not None and not isinstance(getattr(m, name), dict):
                raise ValueError(f"{name!r} must be an object")
        if not isinstance(m.tool.get("version"), str):
            raise ValueError("'tool.version' must be a string")
        if m.kv_cache is not None:
            for key in ("bytes_per_token_before", "bytes_per_token_after", "saving"):
                if not isinstance(m.kv_cache.get(key), (int, float)) or isinstance(m.kv_cache.get(key), bool):
                    raise ValueError(f"'kv_cache.{key}' must be a number")
            at = m.kv_cache.get("at_context")
            if not isinstance(at, dict) or not all(
                isinstance(at.get(str(c)), dict) and {"before", "after"} <= set(at[str(c)]) for c in CONTEXTS
            ):
                raise ValueError("'kv_cache.at_context' must give before/after sizes")
        if m.source is not None:
            m.source = _record(SourceRecord, m.source, "source")
            if not isinstance(m.source.files, dict):
                raise ValueError("'source.files' must be an object")
        if m.conversion is not None:
            m.conversion = _record(ConversionRecord, m.conversion, "conversion")
            if m.conversion.kv_heads_after < 1 or m.conversion.kv_heads_before < m.conversion.kv_heads_after:
                raise ValueError("'conversion.kv_heads_after' must be between 1 and kv_heads_before")
        return m


def _record(kind: type, value: Any, where: str) -> Any:
    """A record from its JSON object: every field present where required, of its declared type."""
    if not isinstance(value, dict):
        raise ValueError(f"{where!r} must be an object")
    hints = typing.get_type_hints(kind)
    for f in fields(kind):
        if f.name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{where!r} lacks {f.name!r}")
            continue
        item, hint = value[f.name], hints[f.name]
        if not (accepts(hint, item) or (item == [] and typing.get_origin(hint) is list)):
            raise ValueError(f"'{where}.{f.name}' must be {describe_type(hints[f.name])}")
    return kind(**{k: v for k, v in value.items() if k in hints})


def model_card(m: Manifest) -> str:
    """A Hugging Face model card for a conversion manifest."""
    src, conv, kv = m.source, m.conversion, m.kv_cache
    assert src is not None and conv is not None and kv is not None
    g, h = conv.kv_heads_after, conv.n_heads
    kind = "MQA" if g == 1 else f"GQA-{g}"
    base = src.hub_id or src.name
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: transformers",
        "tags:",
        "- gqa",
        "- gqa-convert",
        f"- {kind.lower()}",
        "---",
        "",
        f"# {m.output_name}: {kind} conversion of {base}",
        "",
        f"Converted by gqa-convert {m.tool['version']}: the attention key/value heads of every layer were "
        f"turned from {conv.kv_heads_before} into {g} shared head{'s' if g > 1 else ''} for {h} query heads, "
        f"using the **{conv.method}** method ({conv.method_summary}). "
        "This follows Ainslie et al. 2023, *GQA: Training Generalized Multi-Query Transformer Models from "
        "Multi-Head Checkpoints* (arXiv 2305.13245).",
        "",
    ]
    if conv.emulated:
        lines += [
            "**Emulated:** K/V heads are repeated back to the original count; this shows GQA quality but saves no memory.",
            "",
        ]
    lines += [f"**Note:** {note}" for note in conv.notes] + ([""] if conv.notes else [])
    lines += [
        "| | source | converted |",
        "|---|---|---|",
        f"| KV heads | {conv.kv_heads_before} | {g} |",
        f"| KV cache per token | {human_bytes(kv['bytes_per_token_before'])} | {human_bytes(kv['bytes_per_token_after'])} |",
    ]
    for c in CONTEXTS:
        at = kv["at_context"][str(c)]
        lines.append(
            f"| KV cache at {c // 1024}k tokens (batch 1) | {human_bytes(at['before'])} | {human_bytes(at['after'])} |"
        )
    lines += [
        "",
        f"KV cache saving: {kv['saving']:.1%}.",
        "",
    ]
    if m.uptraining:
        up = m.uptraining
        lines += [
            f"Uptrained after conversion for {up['steps']:,} steps ({up['tokens']:,} tokens) by `gqa-convert uptrain`"
            + (" (repeated K/V heads kept tied)" if up.get("tied_kv_groups") else "")
            + ". Measure it with `gqa-convert verify`.",
            "",
        ]
    else:
        lines += [
            "The model has not been uptrained: expect some loss of quality until it is (the paper uptrains for "
            "about 5% of the original pre-training). Measure it with `gqa-convert verify`.",
            "",
        ]
    lines += [
        "Reproduce with:",
        "",
        "```",
        m.command or "",
        "```",
        "",
    ]
    return "\n".join(lines)
