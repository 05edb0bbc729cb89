"""Calibration for `--method fold --calib FILE`: one forward pass over calibration text,
collecting each attention block's second moment of the key/value input [x; 1] (float64).

On a GPU the model runs there in the checkpoint's dtype; on CPU in float32, and a model
larger than the memory budget is run layer by layer from disk (Accelerate's offloading)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..architectures import Family, context_length, key_module, module_path
from ..architectures.objectives import run
from ..data import build_stream, describe, iter_documents
from ..errors import ConversionError
from ..io.hf import load_model, load_tokenizer, quiet_transformers, refuse_remote_code
from ..io.safetensors_format import DTYPES
from ..options import DEFAULT_CALIB_TOKENS, MAX_TRAIN_SEQ_LEN


@dataclass(frozen=True)
class Calibration:
    moments: dict[int, torch.Tensor]  # block -> (hidden+1, hidden+1), float64 on CPU
    tokens: int
    files: dict[str, str]  # spec -> sha256
    bytes: int
    offloaded: bool
    device: str = "cpu"

    def describe(self) -> dict[str, object]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "offloaded": self.offloaded,
            "device": self.device,
        }


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 8 << 30


def calibration_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(
    root: Path, family: Family, dtype: torch.dtype, device: str, budget: int, fp32_bytes: int, trust: bool, offload: str
):
    """(model, offloaded): in memory on `device` if it fits, else spread by Accelerate over the
    GPU, RAM and `offload` on disk, layer by layer."""
    if device == "cpu" and fp32_bytes <= budget:
        return load_model(root, family, dtype, device, trust), False
    if device != "cpu":
        try:
            return load_model(root, family, dtype, device, trust), False
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    import transformers

    quiet_transformers()
    model = getattr(transformers, family.auto_class).from_pretrained(
        root,
        dtype=dtype,
        device_map="auto",
        max_memory={"cpu": budget} if device == "cpu" else None,
        offload_folder=offload,
        trust_remote_code=trust,
    )
    return model.eval(), True


def _input_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def collect(
    root: Path,
    config: dict,
    family: Family,
    blocks: list[str],
    data: list[str],
    *,
    tokens: int = DEFAULT_CALIB_TOKENS,
    seq_len: int | None = None,
    separator: str | None = None,
    text_field: str = "text",
    bytes_fp32: int = 0,
    memory_budget: int | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    checkpoint_dtype: str = "F32",
) -> Calibration:
    """Second moments of each block's key/value input; `blocks` are the blocks' tensor-name
    prefixes (the plan's), in the plan's order."""
    quiet_transformers()
    refuse_remote_code(config, root, trust_remote_code)
    device = device or calibration_device()
    tokenizer = load_tokenizer(root, trust_remote_code, why="to tokenize the --calib text")
    docs = iter_documents(data, separator=separator, text_field=text_field)
    stream = build_stream(tokenizer, docs, tokens, bos=tokenizer.bos_token_id is not None).ids
    if len(stream) < 2:
        raise ConversionError("the calibration data gives fewer than 2 tokens")
    sources = [describe(spec) for spec in data]
    # CPU: float32 (half-precision matmuls there are slow and lossy); GPU: the checkpoint's dtype.
    dtype = torch.float32 if device == "cpu" else DTYPES.get(checkpoint_dtype, torch.float32)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        dtype = torch.float32
    budget = memory_budget or _available_ram() // 2
    offload_dir = tempfile.TemporaryDirectory(prefix="gqa-calib-offload-")
    model, offloaded = _load(root, family, dtype, device, budget, bytes_fp32, trust_remote_code, offload_dir.name)
    vocab = model.get_input_embeddings().num_embeddings
    if int(stream.max()) >= vocab:
        del model
        offload_dir.cleanup()
        raise ConversionError(
            f"the tokenizer gives token id {int(stream.max())} for the --calib text, but the model has only {vocab} "
            "embeddings; the tokenizer does not belong to this model"
        )
    hidden = int(config[family.hidden_key])
    sums = {i: torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64, device=device) for i in range(len(blocks))}
    rows = {i: 0 for i in range(len(blocks))}

    def hook(layer: int):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)  # constant-1 input
            sums[layer] += (x.T @ x).to(sums[layer].device)
            rows[layer] += x.shape[0]

        return accumulate

    handles = []
    for i, prefix in enumerate(blocks):
        name = module_path(family, prefix) + "." + key_module(family)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConversionError(f"calibration: cannot find module {name!r} in the loaded model") from None
        handles.append(module.register_forward_pre_hook(hook(i)))
    seq_len = seq_len or min(context_length(family, config), MAX_TRAIN_SEQ_LEN)
    if family.objective == "seq2seq":
        seq_len = max(4, seq_len)
    try:
        with torch.inference_mode():
            for start in range(0, len(stream), seq_len):
                chunk = stream[start : start + seq_len]
                if family.objective == "seq2seq" and len(chunk) < 4:
                    continue  # too short to split into an encoder and a decoder half
                run(model, family, chunk[None].to(_input_device(model)))
    finally:
        for h in handles:
            h.remove()
        del model
        offload_dir.cleanup()
    n = len(stream)
    # Each block's moment is an average over the rows it saw: every token for causal models;
    # for seq2seq, the encoder half (cross-attention K/V input) or the decoder half.
    moments = {i: (s / max(rows[i], 1)).cpu() for i, s in sums.items()}
    return Calibration(
        moments,
        n,
        {s.spec: s.sha256 for s in sources},
        sum(s.bytes for s in sources),
        offloaded,
        device,
    )
