"""What an uptraining run will cost, estimated before it starts (`uptrain --dry-run`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostEstimate:
    params_total: int
    params_trained: int
    bytes_weights: int
    bytes_grads: int
    bytes_optimizer: int
    bytes_activations: int
    tokens: int
    seconds: float | None = None  # from a measured warm-up, when a GPU is present

    @property
    def bytes_total(self) -> int:
        return self.bytes_weights + self.bytes_grads + self.bytes_optimizer + self.bytes_activations


def estimate(
    *,
    params_total: int,
    params_trained: int,
    weight_bytes: int,
    n_layers: int,
    hidden: int,
    n_heads: int,
    vocab: int,
    micro_batch: int,
    seq_len: int,
    tokens: int,
    act_bytes: int = 2,
    checkpointing: bool = False,
    world_size: int = 1,
    sharded: bool = False,
) -> CostEstimate:
    """Memory per GPU. Activations follow Korthikanti et al. 2022 (per layer, per sequence:
    s*b*h*(34 + 5*a*s/h) bytes at 16-bit; with checkpointing only each layer's input
    is kept, 2*s*b*h bytes), plus the float32 logits; AdamW keeps two float32 states."""
    s, b, h, a = seq_len, micro_batch, hidden, n_heads
    if checkpointing:
        per_layer = 2 * s * b * h
    else:
        per_layer = int(s * b * h * (34 + 5 * a * s / h) * act_bytes / 2)
    activations = n_layers * per_layer + 2 * s * b * vocab * 4  # logits and their gradient in float32
    shard = world_size if sharded else 1
    grads = params_trained * 4 // shard
    optimizer = params_trained * 8 // shard
    return CostEstimate(params_total, params_trained, weight_bytes // shard, grads, optimizer, activations, tokens)
