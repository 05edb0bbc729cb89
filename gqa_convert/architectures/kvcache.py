"""KV cache arithmetic: what GQA buys."""

from __future__ import annotations

CONTEXTS = (4096, 32768)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_value: int) -> int:
    """K and V for every layer: 2 x layers x KV heads x head_dim values per token."""
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_value


def kv_summary(per_token_before: int, per_token_after: int) -> dict[str, object]:
    return {
        "bytes_per_token_before": per_token_before,
        "bytes_per_token_after": per_token_after,
        "saving": 1 - per_token_after / per_token_before if per_token_before else 0.0,
        "at_context": {str(c): {"before": per_token_before * c, "after": per_token_after * c} for c in CONTEXTS},
    }
