"""`verify(...) -> VerifyReport`: integrity checks, then perplexity of the converted model
and its reference on exactly the same tokens, KV cache sizes, optional greedy samples.
Head counts, the context length, how to load and how to score come from the family table."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..architectures import Family, check_length, context_length, family_for, head_shape
from ..architectures.kvcache import CONTEXTS, kv_bytes_per_token
from ..data import DataSource, build_stream, check_data, describe, iter_documents
from ..errors import ConversionError, shown
from ..io.hf import TORCH_DTYPES, check_device, config_dtype, load_model, load_tokenizer, refuse_remote_code
from ..io.safetensors_format import DTYPES as SAFETENSORS_DTYPES
from ..io.source import is_local, read_config, resolve
from ..manifest import Manifest
from ..options import DEFAULT_VERIFY_TOKENS, MAX_VERIFY_SEQ_LEN, check
from .integrity import Check, open_checked
from .perplexity import Score, score


@dataclass
class ModelResult:
    role: str  # "converted" or "reference"
    path: str
    family: str
    kv_heads: int
    kv_bytes_per_token: int
    kv_at_context: dict[str, int] = field(default_factory=dict)
    emulated: bool = False  # K/V heads repeated back to H: the cache holds every head
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


def _resolve_dtype(name: str, config: dict[str, Any], device: str) -> torch.dtype:
    if name == "auto":
        if device == "cpu":  # half-precision matmuls on CPU are slow and lossy: measure in float32
            return torch.float32
        return config_dtype(config)
    if name not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {name[:40]!r}: choose auto, float32, bfloat16 or float16")
    return TORCH_DTYPES[name]


def _reference_from_manifest(manifest: Manifest | None) -> str | None:
    if manifest is None or manifest.source is None:
        return None
    src = manifest.source
    if src.path and is_local(src.path) and Path(src.path).is_dir():
        return src.path  # the very files converted (for a hub source, the pinned snapshot)
    if src.hub_id:
        return src.hub_id
    raise ConversionError(
        f"the conversion manifest names the source {shown(src.path, 200)}, which is gone; pass --reference SOURCE"
    )


def _greedy(model: torch.nn.Module, family: Family, tokenizer, prompt: str, n: int, device: str) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        if tokenizer.bos_token_id is None:
            raise ConversionError("--prompt gives no tokens; give a prompt to generate from")
        enc = tokenizer(tokenizer.bos_token or "", return_tensors="pt", add_special_tokens=False)
    check_length(family, model.config.to_dict(), enc["input_ids"].shape[1] + n, "--prompt plus --generate")
    enc = enc.to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    if model.config.is_encoder_decoder:
        return tokenizer.decode(out[0], skip_special_tokens=True)
    return tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)


def model_result(
    role: str, path: str, family: Family, config: dict[str, Any], dtype: torch.dtype, emulated: bool = False
) -> ModelResult:
    """KV heads and cache size from the family table (an emulated model caches every head)."""
    shape = head_shape(family, config)
    per_token = kv_bytes_per_token(shape.n_layers, shape.n_kv_heads, shape.head_dim, dtype.itemsize)
    at = {str(c): per_token * c for c in CONTEXTS}
    return ModelResult(role, path, family.name, shape.n_kv_heads, per_token, at, emulated)


@dataclass
class _Reference:
    root: Path
    family: Family
    config: dict[str, Any]


def _reference(spec: str | None, trust_remote_code: bool, family: Family) -> _Reference | None:
    if spec is None:
        return None
    root = resolve(spec).root
    config = read_config(root)
    refuse_remote_code(config, root, trust_remote_code)
    ref_family = family_for(config)
    if ref_family.objective != family.objective:
        raise ConversionError(
            f"the reference is a {ref_family.name} model and the converted one a {family.name}: they are not "
            "scored the same way and cannot be compared"
        )
    return _Reference(root, ref_family, config)


def _settings(
    family: Family, config: dict[str, Any], tokenizer, seq_len: int | None, stride: int | None, bos: bool | None
) -> dict[str, Any]:
    """Windows and BOS policy, from the options and the family's context length."""
    use_bos = tokenizer.bos_token_id is not None if bos is None else bos
    seq_len = seq_len or min(context_length(family, config), MAX_VERIFY_SEQ_LEN)
    stride = stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise ConversionError(f"--stride must be between 1 and --seq-len ({seq_len})")
    if family.objective == "seq2seq" and seq_len < 4:
        raise ConversionError(f"--seq-len must be at least 4 for {family.name} (windows are split in halves)")
    check_length(family, config, seq_len, "--seq-len")
    causal = family.objective == "causal"
    return {
        "seq_len": seq_len,
        "stride": stride if causal else seq_len,
        "scheme": "sliding window"
        if causal
        else "each window: encoder reads the first half, decoder scored on the second",
        "use_bos": use_bos,
        "bos": f"BOS (id {tokenizer.bos_token_id}) before each document"
        if use_bos and tokenizer.bos_token_id is not None
        else "no BOS",
    }


def _stream(data, separator, text_field, tokenizer, max_tokens, settings, vocab: int, ref, trust) -> torch.Tensor:
    """The token stream both models score, checked against the model and the reference's tokenizer."""
    docs = iter_documents(data, separator=separator, text_field=text_field)
    built = build_stream(tokenizer, docs, max_tokens, settings["use_bos"])
    stream = built.ids
    if len(stream) < 2:
        raise ConversionError("the data gives fewer than 2 tokens; nothing to score")
    if int(stream.max()) >= vocab:
        raise ConversionError(
            f"the tokenizer gives token id {int(stream.max())}, but the model has only {vocab} embeddings"
        )
    if ref is not None:
        ref_vocab = ref.config.get("vocab_size")
        if isinstance(ref_vocab, int) and int(stream.max()) >= ref_vocab:
            raise ConversionError(
                f"the tokenizer gives token id {int(stream.max())}, but the reference has only {ref_vocab} embeddings; "
                "they cannot be compared"
            )
        ref_tok = load_tokenizer(ref.root, trust, why="to score the reference")
        sample = next(iter_documents(data, separator=separator, text_field=text_field))[:2000]
        if (
            ref_tok(sample, add_special_tokens=False)["input_ids"]
            != tokenizer(sample, add_special_tokens=False)["input_ids"]
        ):
            raise ConversionError(
                "the converted model and the reference tokenize the data differently; they cannot be compared"
            )
    settings |= {"tokens_in_stream": len(stream), "documents": built.documents, "bytes": built.bytes}
    settings |= {"words": built.words, "max_tokens": max_tokens, "separator": separator or "blank lines"}
    return stream


def verify(
    converted: str,
    *,
    reference: str | None = None,
    use_manifest: bool = True,
    data: list[str] | None = None,
    separator: str | None = None,
    text_field: str = "text",
    max_tokens: int = DEFAULT_VERIFY_TOKENS,
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
    check(max_tokens=max_tokens, seq_len=seq_len, stride=stride, batch_size=batch_size)
    check(generate=generate, max_ppl_ratio=max_ppl_ratio)
    device = check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if data:
        check_data(data)
    source, family, checks = open_checked(converted, trust_remote_code)
    root = source.root
    manifest = Manifest.read(root)
    if reference is None and use_manifest:
        reference = _reference_from_manifest(manifest)
    ref = _reference(reference, trust_remote_code, family)
    if max_ppl_ratio is not None and (ref is None or not data):
        raise ConversionError(
            "--max-ppl-ratio compares with a reference on --data: give --data, and a reference "
            "(--reference, or a conversion manifest naming its source)"
        )
    torch_dtype = _resolve_dtype(dtype, source.config, device)
    largest = max(source.tensors.values(), key=lambda t: t.nbytes)
    kv_dtype = SAFETENSORS_DTYPES[largest.dtype]  # the checkpoint's own dtype, not the one measured in
    emulated = manifest.emulated if manifest else False
    tokenizer = load_tokenizer(root, trust_remote_code, why="to score or generate text") if data or generate else None

    model = load_model(root, family, torch_dtype, device, trust_remote_code)
    checks.append(Check(f"loads with {family.auto_class}", type(model).__name__))
    report = VerifyReport(
        converted=model_result("converted", str(root), family, source.config, kv_dtype, emulated),
        reference=model_result("reference", str(ref.root), ref.family, ref.config, kv_dtype) if ref else None,
        checks=checks,
        settings={},
        data=[],
        max_ppl_ratio=max_ppl_ratio,
    )
    if report.reference:
        report.kv_saving = 1 - report.converted.kv_bytes_per_token / report.reference.kv_bytes_per_token
    stream = None
    if data:
        report.settings = _settings(family, source.config, tokenizer, seq_len, stride, bos)
        report.settings |= {"batch_size": batch_size, "dtype": str(torch_dtype).replace("torch.", ""), "device": device}
        vocab = model.get_input_embeddings().num_embeddings
        stream = _stream(
            data, separator, text_field, tokenizer, max_tokens, report.settings, vocab, ref, trust_remote_code
        )
        report.data = [describe(spec) for spec in data]
        on_stage("converted", len(stream))
        _measure(report.converted, model, family, stream, report.settings, device, on_tokens)
    if generate:
        report.converted.sample = _greedy(model, family, tokenizer, prompt, generate, device)
        report.settings["prompt"] = prompt
    del model
    gc.collect()

    if ref is not None and (stream is not None or generate):
        model = load_model(ref.root, ref.family, torch_dtype, device, trust_remote_code)
        if stream is not None:
            on_stage("reference", len(stream))
            _measure(report.reference, model, ref.family, stream, report.settings, device, on_tokens)
            report.ppl_ratio = report.converted.ppl / report.reference.ppl
            report.ppl_diff = report.converted.ppl - report.reference.ppl
        if generate:
            ref_tok = load_tokenizer(ref.root, trust_remote_code, why="to generate from the reference")
            report.reference.sample = _greedy(model, ref.family, ref_tok, prompt, generate, device)
        del model
    if max_ppl_ratio is not None and report.ppl_ratio is not None:
        report.passed = report.ppl_ratio <= max_ppl_ratio
    return report


def _measure(result: ModelResult, model, family: Family, stream, settings: dict[str, Any], device, on_tokens) -> None:
    start = time.perf_counter()
    s: Score = score(
        model, family, stream, settings["seq_len"], settings["stride"], settings["batch_size"], device, on_tokens
    )
    result.tokens_per_second = s.tokens / (time.perf_counter() - start)
    result.tokens = s.tokens
    result.loss = s.loss
    result.ppl = s.ppl
    n_bytes, n_words = settings["bytes"], settings["words"]
    result.bits_per_byte = s.nll / math.log(2) / n_bytes if n_bytes else None
    result.word_ppl = math.exp(s.nll / n_words) if n_words else None
