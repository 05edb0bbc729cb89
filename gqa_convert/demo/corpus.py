"""A synthetic corpus with structure that only attention can use: each token copies the
token 2, 5, 11 or 23 places back (each with probability 1/5) or is random noise. Reading
those four distances takes heads that attend by relative position, so a trained model's
heads specialise, and merging heads of different jobs shows in the perplexity."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BOS = 1


def word(i: int) -> str:
    return f"w{i}"


OFFSETS = (2, 5, 11, 23)


def sequence(rng: random.Random, n_words: int, length: int) -> list[int]:
    """One document of `length` word ids (0-based word indices)."""
    out = [rng.randrange(n_words) for _ in range(max(OFFSETS))]
    while len(out) < length:
        k = rng.randrange(len(OFFSETS) + 1)
        out.append(out[-OFFSETS[k]] if k < len(OFFSETS) else rng.randrange(n_words))
    return out[:length]


def token_batches(seed: int, n_words: int, batch: int, seq_len: int):
    """Endless (batch, seq_len) tensors of token ids: BOS, then a document."""
    rng = random.Random(seed)
    while True:
        rows = [[BOS] + [len(SPECIALS) + w for w in sequence(rng, n_words, seq_len - 1)] for _ in range(batch)]
        yield torch.tensor(rows)


def write_text(path: Path, seed: int, n_words: int, n_docs: int, length: int) -> None:
    """Documents as text (space-separated words), separated by blank lines."""
    rng = random.Random(seed)
    docs = [" ".join(word(w) for w in sequence(rng, n_words, length)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def save_tokenizer(out_dir: Path, n_words: int, model_max_length: int) -> None:
    """A word-level fast tokenizer (tokenizer.json) that AutoTokenizer loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)} | {word(i): len(SPECIALS) + i for i in range(n_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
