"""Calibration for `--method fold --calib FILE`: one forward pass over calibration text,
collecting each layer's second moment of the attention input [x; 1] (float64). A model
larger than the memory budget is run layer by layer from disk (Accelerate's offloading)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import Family
from .data import load_documents
from .errors import ConversionError
from .integrity import load_model, quiet_transformers, refuse_remote_code
from .perplexity import build_stream


@dataclass
class Calibration:
    moments: dict[int, torch.Tensor]  # layer -> (hidden+1, hidden+1)
    tokens: int
    files: dict[str, str]  # spec -> sha256
    bytes: int
    offloaded: bool

    def describe(self) -> dict[str, object]:
        return {"files": self.files, "bytes": self.bytes, "tokens": self.tokens, "offloaded": self.offloaded}


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _load(root: Path, model_bytes_fp32: int, budget: int | None, trust_remote_code: bool, offload: str):
    """The model in float32: in memory if it fits the budget, else offloaded to `offload`."""
    budget = budget or _available_ram() // 2
    if model_bytes_fp32 <= budget:
        return load_model(root, torch.float32, "cpu", trust_remote_code), False
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        root,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=offload,
        trust_remote_code=trust_remote_code,
    )
    return model.eval(), True


def collect(
    root: Path,
    config: dict,
    family: Family,
    attn_prefix: str,
    n_layers: int,
    data: list[str],
    *,
    tokens: int = 32768,
    seq_len: int | None = None,
    separator: str | None = None,
    text_field: str = "text",
    bytes_fp32: int = 0,
    memory_budget: int | None = None,
    trust_remote_code: bool = False,
) -> Calibration:
    from transformers import AutoTokenizer

    quiet_transformers()
    refuse_remote_code(config, root, trust_remote_code)
    docs, sources = load_documents(data, separator=separator, text_field=text_field)
    tokenizer = AutoTokenizer.from_pretrained(root)
    stream, _, _ = build_stream(tokenizer, docs, tokens, bos=tokenizer.bos_token_id is not None)
    if len(stream) < 2:
        raise ConversionError("the calibration data gives fewer than 2 tokens")
    offload_dir = tempfile.TemporaryDirectory(prefix="gqa-calib-offload-")
    model, offloaded = _load(root, bytes_fp32, memory_budget, trust_remote_code, offload_dir.name)
    hidden = int(config[family.hidden_key])
    sums = {i: torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64) for i in range(n_layers)}
    q_name = family.roles["q.weight"].removesuffix(".weight")

    def hook(layer: int):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)  # the constant-1 input
            sums[layer] += x.T @ x

        return accumulate

    handles = []
    for i in range(n_layers):
        name = (
            (attn_prefix.format(layer=i) + q_name).removeprefix("model.")
            if not hasattr(model, "model")
            else (attn_prefix.format(layer=i) + q_name)
        )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConversionError(f"calibration: cannot find module {name!r} in the loaded model") from None
        handles.append(module.register_forward_pre_hook(hook(i)))
    seq_len = seq_len or min(int(config.get("max_position_embeddings") or 2048), 2048)
    try:
        with torch.inference_mode():
            for start in range(0, len(stream), seq_len):
                chunk = stream[start : start + seq_len]
                model(input_ids=chunk[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        del model
        offload_dir.cleanup()
    n = len(stream)
    return Calibration(
        {i: s / n for i, s in sums.items()},
        n,
        {s.spec: s.sha256 for s in sources},
        sum(s.bytes for s in sources),
        offloaded,
    )
