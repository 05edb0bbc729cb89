"""Streaming training data: documents tokenized on the fly, joined with the tokenizer's
BOS/EOS convention and packed into fixed-length blocks; or already-tokenized .npy files.
Deterministic, so a resumed run sees the same blocks in the same order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .data import iter_documents
from .errors import ConversionError


def _token_files(specs: list[str]) -> bool:
    npy = [s.endswith(".npy") for s in specs]
    if any(npy) and not all(npy):
        raise ConversionError("mix of .npy token files and text files; give one kind of --data")
    return all(npy) and bool(specs)


def token_stream(
    tokenizer, specs: list[str], *, separator: str | None = None, text_field: str = "text"
) -> Iterator[int]:
    """One endless stream of token ids: every document as BOS + tokens + EOS (where the
    tokenizer has them), files in order, starting again at the end."""
    if _token_files(specs):
        while True:
            for spec in specs:
                arr = np.load(spec, mmap_mode="r")
                if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                    raise ConversionError(f"{spec}: expected a 1-D integer array of token ids")
                for start in range(0, len(arr), 1 << 20):
                    yield from arr[start : start + (1 << 20)].tolist()
    for spec in specs:
        if not Path(spec).expanduser().is_file() and spec != "wikitext-2":
            raise ConversionError(f"{spec}: no such data file")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while True:
        empty = True
        for doc in iter_documents(specs, separator=separator, text_field=text_field):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            empty = False
            yield from ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        if empty:
            raise ConversionError(f"{', '.join(specs)}: holds no text")


def blocks(stream: Iterator[int], seq_len: int) -> Iterator[torch.Tensor]:
    """Consecutive blocks of seq_len tokens (documents run across block boundaries)."""
    buf: list[int] = []
    for tok in stream:
        buf.append(tok)
        if len(buf) == seq_len:
            yield torch.tensor(buf, dtype=torch.long)
            buf = []


def global_batches(block_iter: Iterator[torch.Tensor], global_batch: int, skip: int = 0) -> Iterator[torch.Tensor]:
    """(global_batch, seq_len) tensors; `skip` whole batches are consumed first (resume)."""
    for _ in range(skip * global_batch):
        next(block_iter)
    while True:
        yield torch.stack([next(block_iter) for _ in range(global_batch)])
