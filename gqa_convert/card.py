"""The model card (README.md) and the machine-readable manifest written beside the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .kvcache import CONTEXTS, human_bytes

MANIFEST = "gqa_convert.json"


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def model_card(m: dict[str, Any]) -> str:
    """A Hugging Face model card for a conversion manifest `m`."""
    src, conv, kv = m["source"], m["conversion"], m["kv_cache"]
    g, h = conv["kv_heads_after"], conv["n_heads"]
    kind = "MQA" if g == 1 else f"GQA-{g}"
    base = src.get("hub_id") or src["name"]
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
        f"# {m['output_name']}: {kind} conversion of {base}",
        "",
        f"Converted by gqa-convert {m['tool']['version']}: the attention key/value heads of every layer were "
        f"turned from {conv['kv_heads_before']} into {g} shared head{'s' if g > 1 else ''} for {h} query heads, "
        f"using the **{conv['method']}** method ({conv['method_summary']}). "
        "This follows Ainslie et al. 2023, *GQA: Training Generalized Multi-Query Transformer Models from "
        "Multi-Head Checkpoints* (arXiv 2305.13245).",
        "",
    ]
    if conv.get("emulated"):
        lines += [
            "**Emulated:** K/V heads are repeated back to the original count; this shows GQA quality but saves no memory.",
            "",
        ]
    lines += [
        "| | source | converted |",
        "|---|---|---|",
        f"| KV heads | {conv['kv_heads_before']} | {g} |",
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
        "The model has not been uptrained: expect some loss of quality until it is (the paper uptrains for about "
        "5% of the original pre-training). Measure it with `gqa-convert verify`.",
        "",
        "Reproduce with:",
        "",
        "```",
        m["command"],
        "```",
        "",
    ]
    return "\n".join(lines)
