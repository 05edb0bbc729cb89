"""Perplexity of fixed-length models with a sliding window (as in the Hugging Face guide):
every token of the stream is scored at most once, with up to seq_len - 1 tokens of
context. Windows of equal shape are batched, only the scored positions go through the
LM head, and log-softmax runs in float32 (fp16 losses overflow otherwise).

Encoder-decoder families (T5) are scored as their family's objective says: the stream is
cut into windows of seq_len tokens; the encoder reads each window's first half and the
decoder, with teacher forcing, is scored on its second half."""

from __future__ import annotations

import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..architectures import Family
from ..architectures.objectives import predict


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    n_score: int  # the last n_score tokens of [begin, end) are scored

    @property
    def length(self) -> int:
        return self.end - self.begin


def windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Sliding windows over a stream: each token after the first scored exactly once
    when stride < seq_len; with stride == seq_len, each window's first token is unscored."""
    if not 0 < stride <= seq_len:
        raise ValueError("stride must be in 1..seq_len")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        n_score = min(end - prev_end, end - begin - 1)  # a token needs one token of context
        if n_score > 0:
            out.append(Window(begin, end, n_score))
        prev_end = end
        if end == n_tokens:
            break
    return out


@dataclass
class Score:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def _forward_logits(model: torch.nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions only (the LM head is the costly part for big vocabularies)."""
    try:
        return model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits[:, -keep:]
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=ids, use_cache=False).logits[:, -keep:]


@torch.inference_mode()
def _batch_nll(model: torch.nn.Module, ids: torch.Tensor, batch: list[Window], device) -> tuple[float, int]:
    length, n_score = batch[0].length, batch[0].n_score
    x = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
    # positions length-1-n_score .. length-2 predict the last n_score tokens
    logits = _forward_logits(model, x, n_score + 1)[:, :-1].float()
    targets = x[:, length - n_score :]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
    return nll, targets.numel()


def score_stream(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    on_tokens=lambda n: None,
    workers: int | None = None,
) -> Score:
    """Sum of token NLLs over the 1-D stream `ids`, windows batched by shape.

    On CPU, batches run on `workers` threads (default: torch's thread count) with one
    intra-op thread each: for small and mid-size models, ops in parallel beat each op
    split across cores. Batch results are summed in a fixed order, so the result does
    not depend on the thread count."""
    groups: dict[tuple[int, int], list[Window]] = defaultdict(list)
    for w in windows(len(ids), seq_len, stride):
        groups[(w.length, w.n_score)].append(w)
    batches = [ws[i : i + batch_size] for ws in groups.values() for i in range(0, len(ws), batch_size)]
    cpu = torch.device(device).type == "cpu"
    workers = (workers or torch.get_num_threads()) if cpu else 1
    rope = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    if "dynamic" in str(rope.get("rope_type", "")):  # dynamic RoPE updates buffers during forward
        workers = 1
    if workers <= 1 or len(batches) == 1:
        results = []
        for b in batches:
            results.append(_batch_nll(model, ids, b, device))
            on_tokens(results[-1][1])
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_batch_nll, model, ids, b, device) for b in batches]
                results = []
                for f in futures:
                    results.append(f.result())
                    on_tokens(results[-1][1])
        finally:
            torch.set_num_threads(threads)
    return Score(sum(r[0] for r in results), sum(r[1] for r in results))


@torch.inference_mode()
def _seq2seq_nll(model: torch.nn.Module, family: Family, x: torch.Tensor) -> tuple[float, int]:
    logits, targets = predict(model, family, x)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
    return nll, targets.numel()


def score_seq2seq(
    model: torch.nn.Module,
    family: Family,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    on_tokens=lambda n: None,
) -> Score:
    """Sum of NLLs of every window's second half, given its first half (see the module doc)."""
    if seq_len < 4:
        raise ValueError("seq2seq scoring needs windows of at least 4 tokens")
    starts = [b for b in range(0, len(ids), seq_len) if len(ids) - b >= 4]
    by_len: dict[int, list[int]] = defaultdict(list)
    for b in starts:
        by_len[min(seq_len, len(ids) - b)].append(b)
    nll, count = 0.0, 0
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            x = torch.stack([ids[b : b + length] for b in group[i : i + batch_size]]).to(device)
            n, c = _seq2seq_nll(model, family, x)
            nll, count = nll + n, count + c
            on_tokens(c)
    return Score(nll, count)


def score(
    model: torch.nn.Module,
    family: Family,
    ids: torch.Tensor,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    on_tokens=lambda n: None,
    workers: int | None = None,
) -> Score:
    """The family's own scoring scheme: sliding windows for causal models, split windows for seq2seq."""
    if family.objective == "seq2seq":
        return score_seq2seq(model, family, ids, seq_len, batch_size, device, on_tokens)
    return score_stream(model, ids, seq_len, stride, batch_size, device, on_tokens, workers)
