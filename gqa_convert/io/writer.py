"""Streaming safetensors shards: every header is computed from the plan up front, then
tensor bytes are appended as they become ready. Nothing is buffered beyond the tensor
being written, so peak memory does not depend on shard or model size."""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from .hashing import Hashes
from .safetensors_format import build_header, itemsize, read_header

ST_METADATA = {"format": "pt"}
WRITEBACK = 64 * 1024 * 1024  # start writing dirty pages back every this many bytes


def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE): start writeback of
    a range without waiting, so the fsync at the end of a shard finds little left to do
    (otherwise every dirty page of the shard is written back only at that fsync)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure here is caught by fsync

    return start_writeback


_start_writeback = _libc_sync_file_range() if os.uname().sysname == "Linux" else None


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes of data
    (a single larger tensor gets a shard of its own), as transformers does."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def index_json(shards: list[list[OutTensor]]) -> dict | None:
    """transformers' model.safetensors.index.json, or None for a single shard (none is written)."""
    if len(shards) == 1:
        return None
    names = shard_file_names(len(shards))
    weight_map = {t.name: f for f, shard in zip(names, shards, strict=True) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


class ShardWriter:
    """Writes the planned shards into `out_dir`; call `write` once per tensor, in plan order.
    Every byte written is fed to `hashes` under "out/<file name>"."""

    def __init__(
        self,
        out_dir: Path,
        shards: list[list[OutTensor]],
        hashes: Hashes,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.out_dir = out_dir
        self.shards = shards
        self.names = shard_file_names(len(shards))
        self.hashes = hashes
        self.on_bytes = on_bytes
        self._shard = -1
        self._pos = 0  # index of the next tensor within the current shard
        self._fd: int | None = None
        self._written = 0  # bytes in the current shard
        self._flushed = 0  # of which writeback has been started

    @property
    def _key(self) -> str:
        return "out/" + self.names[self._shard]

    def _open_next(self) -> None:
        self._close_current()
        self._shard += 1
        self._pos = 0
        shard = self.shards[self._shard]
        header, _ = build_header([(t.name, t.dtype, t.shape) for t in shard], ST_METADATA)
        self._fd = os.open(self.out_dir / self.names[self._shard], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._written = self._flushed = 0
        self._write_all(header)

    def _close_current(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)  # durable before the directory is renamed into place
            os.close(self._fd)
            self._fd = None
            self.hashes.wait(self._key)

    def _write_all(self, data: bytes | memoryview) -> None:
        self.hashes.feed(self._key, data)
        view = memoryview(data)
        while len(view):
            n = os.write(self._fd, view[: 1 << 30])
            view = view[n:]
            self._written += n
        if _start_writeback is not None and self._written - self._flushed >= WRITEBACK:
            _start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        if self._fd is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        expected = self.shards[self._shard][self._pos]
        if expected.name != name:
            raise RuntimeError(f"writer got {name!r}, the plan expects {expected.name!r}")  # a bug, not user error
        size = 0
        for chunk in chunks:
            self._write_all(chunk)
            size += len(chunk)
            self.on_bytes(len(chunk))
        if size != expected.nbytes:
            raise RuntimeError(f"{name}: wrote {size} bytes, the plan says {expected.nbytes}")
        self._pos += 1

    def close(self) -> dict[str, str]:
        """Finish the last shard and the index; returns {shard file: sha256}."""
        done = self._shard + 1 == len(self.shards) and self._pos == len(self.shards[self._shard])
        if not done:
            raise RuntimeError("writer closed before every planned tensor was written")
        self._close_current()
        index = index_json(self.shards)
        if index is not None:
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return {name: self.hashes.hexdigest("out/" + name) for name in self.names}

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_written(out_dir: Path, shards: list[list[OutTensor]]) -> None:
    """Re-open every written shard and compare its header and size with the plan, so a
    write error can never produce a target that looks complete."""
    for file, shard in zip(shard_file_names(len(shards)), shards, strict=True):
        found, meta = read_header(out_dir / file)
        planned = {t.name: t for t in shard}
        if set(found) != set(planned) or meta != ST_METADATA:
            raise ConversionError(f"{file}: written shard does not match the plan (tensor names differ)")
        for name, info in found.items():
            t = planned[name]
            if info.dtype != t.dtype or info.shape != t.shape:
                raise ConversionError(f"{file}: tensor {name!r} was written with the wrong dtype or shape")
        data_end = max((info.end for info in found.values()), default=0)
        if (out_dir / file).stat().st_size != max(data_end, _header_end(out_dir / file)):
            raise ConversionError(f"{file}: written shard has the wrong size")


def _header_end(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")
