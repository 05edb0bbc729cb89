"""Tokens scored per second: `verify`'s batched scorer against the one-window-at-a-time
loop of the Hugging Face perplexity guide, side by side in one run, on the same tokens.

    python scripts/bench_verify.py                       # ../shared ts-mha-8h on the TinyStories eval text
    python scripts/bench_verify.py --model DIR --data FILE --seq-len 512 --stride 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gqa_convert.data import build_stream, iter_documents  # noqa: E402
from gqa_convert.evaluation.perplexity import score_stream  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def guide_loop(model, ids: torch.Tensor, seq_len: int, stride: int, device: str = "cpu") -> tuple[float, int]:
    """The guide's loop: one window per forward pass, full logits, labels masked with -100.
    Returns (total NLL in nats, tokens scored)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        trg_len = end - prev_end
        x = ids[begin:end][None].to(device)
        y = x.clone()
        y[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = model(x, labels=y).loss
        n = (y[:, 1:] != -100).sum().item()  # the model shifts labels by one inside
        nll += loss.item() * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "ts-mha-8h"))
    ap.add_argument("--data", default=str(SHARED / "data" / "tinystories-valid-head64k.txt"))
    ap.add_argument("--separator", default="<|endoftext|>")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--synthetic-vocab",
        type=int,
        default=0,
        help="score a random Llama (hidden 256, 4 layers) with this vocabulary instead of --model's "
        "weights (same tokens): shows where the LM head dominates",
    )
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.synthetic_vocab:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=args.synthetic_vocab,
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=2048,
            )
        ).eval()
    docs = iter_documents([args.data], separator=args.separator)
    ids = build_stream(tok, docs, args.max_tokens, bos=True).ids
    torch.set_num_threads(torch.get_num_threads())

    t0 = time.perf_counter()
    nll_g, n_g = guide_loop(model, ids, args.seq_len, args.stride)
    t_guide = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = score_stream(model, ids, args.seq_len, args.stride, args.batch_size)
    t_ours = time.perf_counter() - t0

    name = f"random Llama, vocab {args.synthetic_vocab}" if args.synthetic_vocab else Path(args.model).name
    print(
        f"model {name}, {len(ids)} tokens, seq-len {args.seq_len}, stride {args.stride}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'scorer':<22} {'tokens':>7} {'ppl':>10} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9}")
    print(
        f"{'guide loop (1 window)':<22} {n_g:>7} {math.exp(nll_g / n_g):>10.5f} {t_guide:>8.2f} {n_g / t_guide:>9.0f} {1:>9.2f}"
    )
    print(
        f"{'verify (batched)':<22} {s.tokens:>7} {s.ppl:>10.5f} {t_ours:>8.2f} {s.tokens / t_ours:>9.0f} "
        f"{(s.tokens / t_ours) / (n_g / t_guide):>9.2f}"
    )
    print(
        f"relative ppl difference: {abs(s.ppl / math.exp(nll_g / n_g) - 1):.2e}  (target: speed-up >= 2 at equal results)"
    )


if __name__ == "__main__":
    main()
