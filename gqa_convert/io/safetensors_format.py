"""The safetensors container, read and written by hand so the converter can stream:
headers are parsed (and checked) without touching tensor data, and output headers are
built from the plan before any weight is read."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [begin, end) in `path`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header; returns (tensors, metadata). Reads no weights."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise ConversionError(
                    f"{path}: corrupt safetensors header (it claims {n} header bytes, the file has {size}); "
                    "re-download or re-save this file."
                )
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise ConversionError(f"{path}: corrupt safetensors header (not valid JSON); re-download this file.") from None
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end - begin != math.prod(shape) * itemsize(dtype):
            raise ConversionError(
                f"{path}: tensor {name!r} has {end - begin} bytes, its shape {list(shape)} needs more"
            )
        if end > data_size:
            raise ConversionError(
                f"{path}: truncated file: the header promises {data_start + end} bytes, the file has {size}; "
                "the download is incomplete, fetch it again."
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """Header bytes (length prefix included) for tensors laid out in the given order,
    and the size of the data section that must follow."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw, offset


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (works for bf16, which numpy lacks)."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def tensor_from_bytes(buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(bytearray(buf), dtype=DTYPES[dtype]).reshape(shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        buf = f.read(info.nbytes)
    if len(buf) != info.nbytes:
        raise ConversionError(f"{info.path}: truncated while reading {info.name!r}")
    return tensor_from_bytes(buf, info.dtype, info.shape)
