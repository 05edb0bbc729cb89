"""How a family's model turns token ids into predictions, for scoring, calibration and
training alike. "causal": each position predicts the next token. "seq2seq" (T5): a sequence
is split in halves; the encoder reads the first, the decoder predicts the second from a
right-shifted copy of it (teacher forcing)."""

from __future__ import annotations

import torch

from .families import Family


def seq2seq_split(ids: torch.Tensor, start_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder ids, decoder input ids, decoder targets) for (batch, length) ids."""
    half = ids.shape[1] // 2
    source, target = ids[:, :half], ids[:, half:]
    start = torch.full_like(target[:, :1], start_id)
    return source, torch.cat([start, target[:, :-1]], dim=1), target


def decoder_start(model: torch.nn.Module) -> int:
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    return int(start if start is not None else (getattr(config, "pad_token_id", None) or 0))


def predict(model: torch.nn.Module, family: Family | None, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets): logits[:, t] predicts targets[:, t]. No family means a causal LM."""
    if family is not None and family.objective == "seq2seq":
        source, decoder_in, target = seq2seq_split(ids, decoder_start(model))
        out = model(input_ids=source, decoder_input_ids=decoder_in, use_cache=False)
        return out.logits, target
    return model(input_ids=ids, use_cache=False).logits[:, :-1], ids[:, 1:]


def run(model: torch.nn.Module, family: Family, ids: torch.Tensor) -> None:
    """A forward pass whose outputs are not needed (calibration hooks read the activations)."""
    if family.objective == "seq2seq":
        source, decoder_in, _ = seq2seq_split(ids, decoder_start(model))
        model(input_ids=source, decoder_input_ids=decoder_in, use_cache=False)
    else:
        model(input_ids=ids, use_cache=False)
