"""`verify(...) -> VerifyReport`: integrity checks, then perplexity of the converted model
and its reference on exactly the same tokens, KV cache sizes, optional greedy samples."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .card import read_manifest
from .data import DataSource, load_documents
from .errors import ConversionError
from .integrity import Check, load_model, open_checked, quiet_transformers, refuse_remote_code
from .io.safetensors_format import DTYPES as SAFETENSORS_DTYPES
from .io.source import read_config, resolve
from .kvcache import CONTEXTS, kv_bytes_per_token
from .perplexity import Score, build_stream, score_stream

DEFAULT_MAX_TOKENS = 16384
MAX_DEFAULT_SEQ_LEN = 1024
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ModelResult:
    role: str  # "converted" or "reference"
    path: str
    kv_heads: int | None
    kv_bytes_per_token: int | None
    kv_at_context: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    loss: float | None = None  # nats per token
    ppl: float | None = None
    bits_per_byte: float | None = None
    word_ppl: float | None = None
    tokens_per_second: float | None = None
    sample: str | None = None


@dataclass
class VerifyReport:
    converted: ModelResult
    reference: ModelResult | None
    checks: list[Check]
    settings: dict[str, Any]
    data: list[DataSource]
    ppl_ratio: float | None = None
    ppl_diff: float | None = None
    kv_saving: float | None = None
    max_ppl_ratio: float | None = None
    passed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kv_numbers(config: dict[str, Any], dtype: torch.dtype) -> tuple[int | None, int | None]:
    """(KV heads, KV cache bytes per token) from a config, or (None, None) if it lacks head counts."""
    n_heads = config.get("num_attention_heads")
    n_layers = config.get("num_hidden_layers")
    if not n_heads or not n_layers:
        return None, None
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    return n_kv, kv_bytes_per_token(n_layers, n_kv, head_dim, torch.empty((), dtype=dtype).element_size())


def _resolve_dtype(name: str, config: dict[str, Any], device: str) -> torch.dtype:
    if name == "auto":
        if device == "cpu":  # half-precision matmuls on CPU are slow and lossy: measure in float32
            return torch.float32
        return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def _reference_from_manifest(converted_root: Path) -> str | None:
    manifest = read_manifest(converted_root)
    if not manifest:
        return None
    src = manifest.get("source", {})
    if src.get("path") and Path(src["path"]).is_dir():
        return src["path"]
    if src.get("hub_id"):
        return src["hub_id"]
    raise ConversionError(
        f"the conversion manifest names the source {src.get('path')!r}, which is gone; pass --reference SOURCE"
    )


def _greedy(model: torch.nn.Module, tokenizer, prompt: str, n: int, device: str) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    return tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)


def verify(
    converted: str,
    *,
    reference: str | None = None,
    use_manifest: bool = True,
    data: list[str] | None = None,
    separator: str | None = None,
    text_field: str = "text",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str | None = None,
    bos: bool | None = None,
    max_ppl_ratio: float | None = None,
    generate: int = 0,
    prompt: str = "Once upon a time",
    trust_remote_code: bool = False,
    on_stage: Callable[[str, int], None] = lambda stage, total: None,
    on_tokens: Callable[[int], None] = lambda n: None,
) -> VerifyReport:
    """Check `converted` and measure it against `reference` (default: the source named in
    its conversion manifest). Raises CheckFailed (exit 1) for a damaged checkpoint and
    ConversionError (exit 2) for bad arguments; a perplexity ratio above `max_ppl_ratio`
    sets `passed = False`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet_transformers()
    source, checks = open_checked(converted, trust_remote_code)
    root = source.root
    if reference is None and use_manifest:
        reference = _reference_from_manifest(root)
    ref_root = None
    if reference is not None:
        ref_root, _ = resolve(reference)
        refuse_remote_code(read_config(ref_root), ref_root, trust_remote_code)
    torch_dtype = _resolve_dtype(dtype, source.config, device)
    largest = max(source.tensors.values(), key=lambda t: t.nbytes)
    kv_dtype = SAFETENSORS_DTYPES[largest.dtype]  # the checkpoint's own dtype, not the one measured in

    conv_model = load_model(root, torch_dtype, device, trust_remote_code)
    checks.append(Check("loads with AutoModelForCausalLM", True, type(conv_model).__name__))
    report = VerifyReport(
        converted=_model_result("converted", str(root), source.config, kv_dtype),
        reference=_model_result("reference", str(ref_root), read_config(ref_root), kv_dtype) if ref_root else None,
        checks=checks,
        settings={},
        data=[],
        max_ppl_ratio=max_ppl_ratio,
    )
    if report.reference and report.reference.kv_bytes_per_token and report.converted.kv_bytes_per_token:
        report.kv_saving = 1 - report.converted.kv_bytes_per_token / report.reference.kv_bytes_per_token

    stream = None
    if data:
        from transformers import AutoTokenizer

        docs, report.data = load_documents(data, separator=separator, text_field=text_field)
        tokenizer = AutoTokenizer.from_pretrained(root)
        use_bos = tokenizer.bos_token_id is not None if bos is None else bos
        context = int(source.config.get("max_position_embeddings") or MAX_DEFAULT_SEQ_LEN)
        seq_len = seq_len or min(context, MAX_DEFAULT_SEQ_LEN)
        stride = stride or max(1, seq_len // 2)
        if not 0 < stride <= seq_len or seq_len < 2:
            raise ConversionError(f"--stride must be between 1 and --seq-len ({seq_len}), and --seq-len at least 2")
        stream, n_bytes, n_words = build_stream(tokenizer, docs, max_tokens, use_bos)
        if len(stream) < 2:
            raise ConversionError("the data gives fewer than 2 tokens; nothing to score")
        vocab = conv_model.get_input_embeddings().num_embeddings
        if int(stream.max()) >= vocab:
            raise ConversionError(
                f"the tokenizer gives token id {int(stream.max())}, but the model has only {vocab} embeddings"
            )
        if ref_root is not None:
            ref_tok = AutoTokenizer.from_pretrained(ref_root)
            if (
                ref_tok(docs[0][:2000], add_special_tokens=False)["input_ids"]
                != tokenizer(docs[0][:2000], add_special_tokens=False)["input_ids"]
            ):
                raise ConversionError(
                    "the converted model and the reference tokenize the data differently; they cannot be compared"
                )
        report.settings = {
            "tokens_in_stream": len(stream),
            "seq_len": seq_len,
            "stride": stride,
            "batch_size": batch_size,
            "bos": f"BOS (id {tokenizer.bos_token_id}) before each document"
            if use_bos and tokenizer.bos_token_id is not None
            else "no BOS",
            "dtype": str(torch_dtype).replace("torch.", ""),
            "device": device,
            "max_tokens": max_tokens,
            "separator": separator or "blank lines",
            "bytes": n_bytes,
            "words": n_words,
        }
        on_stage("converted", len(stream))
        _measure(report.converted, conv_model, stream, seq_len, stride, batch_size, device, n_bytes, n_words, on_tokens)
    if generate:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(root)
        report.converted.sample = _greedy(conv_model, tok, prompt, generate, device)
        report.settings["prompt"] = prompt
    del conv_model
    gc.collect()

    if ref_root is not None and (stream is not None or generate):
        ref_model = load_model(ref_root, torch_dtype, device, trust_remote_code)
        if stream is not None:
            on_stage("reference", len(stream))
            _measure(
                report.reference,
                ref_model,
                stream,
                seq_len,
                stride,
                batch_size,
                device,
                report.settings["bytes"],
                report.settings["words"],
                on_tokens,
            )
            report.ppl_ratio = report.converted.ppl / report.reference.ppl
            report.ppl_diff = report.converted.ppl - report.reference.ppl
        if generate:
            from transformers import AutoTokenizer

            report.reference.sample = _greedy(
                ref_model, AutoTokenizer.from_pretrained(ref_root), prompt, generate, device
            )
        del ref_model
    if max_ppl_ratio is not None and report.ppl_ratio is not None:
        report.passed = report.ppl_ratio <= max_ppl_ratio
    return report


def _model_result(role: str, path: str, config: dict[str, Any], dtype: torch.dtype) -> ModelResult:
    n_kv, per_token = _kv_numbers(config, dtype)
    at = {str(c): per_token * c for c in CONTEXTS} if per_token else {}
    return ModelResult(role, path, n_kv, per_token, at)


def _measure(
    result: ModelResult, model, stream, seq_len, stride, batch_size, device, n_bytes, n_words, on_tokens
) -> None:
    start = time.perf_counter()
    s: Score = score_stream(model, stream, seq_len, stride, batch_size, device, on_tokens)
    result.tokens_per_second = s.tokens / (time.perf_counter() - start)
    result.tokens = s.tokens
    result.loss = s.loss
    result.ppl = s.ppl
    result.bits_per_byte = s.nll / math.log(2) / n_bytes
    result.word_ppl = math.exp(s.nll / n_words) if n_words else None
