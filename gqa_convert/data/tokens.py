"""Token streams from documents: a bounded stream for scoring and calibration, and an
endless, deterministic one packed into fixed-length blocks for training (or read from
already-tokenized .npy files). A resumed run sees the same blocks in the same order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConversionError
from .documents import check_data, iter_documents


@dataclass
class TokenStream:
    ids: torch.Tensor  # (n,) long
    bytes: int  # UTF-8 bytes of the text the stream covers
    words: int
    documents: int  # documents (or parts of the last one) in the stream


def build_stream(tokenizer, documents: Iterable[str], max_tokens: int, bos: bool) -> TokenStream:
    """Tokenize documents into one stream (BOS before each when `bos`), cut at max_tokens.
    Documents are read lazily: no more of the data is tokenized than the stream needs."""
    ids: list[int] = []
    n_bytes = n_words = n_docs = 0
    bos_id = tokenizer.bos_token_id
    for doc in documents:
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if bos and bos_id is not None:
            toks = [bos_id, *toks]
        room = max_tokens - len(ids)
        if len(toks) > room:  # a partial last document: count the text its tokens cover
            toks = toks[:room]
            doc = tokenizer.decode(toks, skip_special_tokens=True)
        ids.extend(toks)
        n_bytes += len(doc.encode("utf-8"))
        n_words += len(doc.split())
        n_docs += 1
        if len(ids) >= max_tokens:
            break
    return TokenStream(torch.tensor(ids, dtype=torch.long), n_bytes, n_words, n_docs)


def _token_files(specs: list[str]) -> bool:
    npy = [s.endswith(".npy") for s in specs]
    if any(npy) and not all(npy):
        raise ConversionError("mix of .npy token files and text files; give one kind of --data")
    return all(npy) and bool(specs)


def _load_tokens(spec: str, vocab: int | None) -> np.ndarray:
    try:
        arr = np.load(spec, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConversionError(f"{spec}: not a readable .npy array of token ids ({str(e)[:120]})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConversionError(f"{spec}: expected a 1-D integer array of token ids")
    for start in range(0, len(arr), 1 << 24):  # ids outside the embedding table would crash the model
        part = arr[start : start + (1 << 24)]
        lo, hi = int(part.min()), int(part.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            bad = lo if lo < 0 else hi
            raise ConversionError(f"{spec}: token id {bad} is outside the model's vocabulary 0..{(vocab or 1) - 1}")
    return arr


def token_stream(
    tokenizer, specs: list[str], *, separator: str | None = None, text_field: str = "text", vocab: int | None = None
) -> Iterator[int]:
    """One endless stream of token ids: every document as BOS + tokens + EOS (where the
    tokenizer has them), files in order, starting again at the end. Data that gives no
    token at all is an error, never an endless loop."""
    if _token_files(specs):
        arrays = [_load_tokens(spec, vocab) for spec in specs]
        if not any(len(a) for a in arrays):
            raise ConversionError(f"{', '.join(specs)}: holds no tokens")
        while True:
            for arr in arrays:
                for start in range(0, len(arr), 1 << 20):
                    yield from arr[start : start + (1 << 20)].tolist()
    check_data(specs)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while True:
        produced = False
        for doc in iter_documents(specs, separator=separator, text_field=text_field, split="train"):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            piece = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
            if vocab is not None and piece and max(piece) >= vocab:
                raise ConversionError(
                    f"the tokenizer gives token id {max(piece)}, but the model has only {vocab} embeddings; "
                    "the tokenizer does not belong to this model"
                )
            produced = produced or bool(piece)
            yield from piece
        if not produced:
            raise ConversionError(f"{', '.join(specs)}: gives no tokens")


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
