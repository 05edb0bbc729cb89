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


def _corrupt(path: Path, why: str) -> ConversionError:
    return ConversionError(f"{path}: corrupt safetensors header ({why}); re-download or re-save this file.")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the name {key[:80]!r} appears twice")
        seen[key] = value
    return seen


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header by safetensors' own rules; returns (tensors,
    metadata). Reads no weights. The rules: a JSON object of at most 100 MB; `__metadata__`,
    if present, maps strings to strings; every entry has a known dtype, a shape of
    non-negative integers and [begin, end] offsets whose size matches dtype x shape; the
    offsets, sorted, tile the data section exactly, from 0 to the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise _corrupt(path, f"it claims {n} header bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise _corrupt(path, "nested too deeply") from None
    except UnicodeDecodeError:
        raise _corrupt(path, "not UTF-8") from None
    except ValueError as e:
        why = str(e) if "appears twice" in str(e) or "object" in str(e) else "not valid JSON"
        raise _corrupt(path, why) from None
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise ValueError
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES or not isinstance(shape, list):
                raise ValueError
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError
            begin, end = offsets
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (begin, end)) or not 0 <= begin <= end:
                raise ValueError
        except ValueError:
            raise _corrupt(path, f"bad entry for {name[:80]!r}") from None
        shape = tuple(shape)
        if end - begin != math.prod(shape) * itemsize(dtype):
            raise _corrupt(
                path,
                f"tensor {name[:80]!r} has {end - begin} bytes, its dtype and shape {list(shape)[:8]} need "
                f"{math.prod(shape) * itemsize(dtype)}",
            )
        if end > data_size:
            raise ConversionError(
                f"{path}: truncated file: the header promises {data_start + end} bytes, the file has {size}; "
                "the download is incomplete, fetch it again."
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            what = "overlap" if info.begin < position else "leave a gap"
            raise _corrupt(path, f"tensor {info.name[:80]!r}: offsets {what} (tensors must tile the data in order)")
        position = info.end
    if position != size:
        raise _corrupt(path, f"{size - position} bytes after the last tensor that no tensor owns")
    return tensors, dict(metadata)


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


def tensor_from_buffer(buf: bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over `buf` itself (no copy): `buf` must not be used for anything else."""
    if len(buf) == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        buf = f.read(info.nbytes)
    if len(buf) != info.nbytes:
        raise ConversionError(f"{info.path}: truncated while reading {info.name!r}")
    return tensor_from_bytes(buf, info.dtype, info.shape)
