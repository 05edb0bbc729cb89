"""Streaming safetensors shards: every header is computed from the plan up front, then
tensor bytes are appended as they become ready. Nothing is buffered beyond the tensor
being written, so peak memory does not depend on shard or model size."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from .safetensors_format import build_header, itemsize, read_header

ST_METADATA = {"format": "pt"}
_COPY_CHUNK = 64 * 1024 * 1024


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


@dataclass(frozen=True)
class RawRange:
    """Bytes to copy verbatim from a source file: [begin, end)."""

    path: Path
    begin: int
    end: int


class ShardWriter:
    """Writes the planned shards into `out_dir`; call `write` once per tensor, in plan order."""

    def __init__(
        self,
        out_dir: Path,
        shards: list[list[OutTensor]],
        on_bytes: Callable[[int], None] = lambda n: None,
        on_shard_done: Callable[[Path], None] = lambda p: None,
    ) -> None:
        self.out_dir = out_dir
        self.shards = shards
        self.names = shard_file_names(len(shards))
        self.on_bytes = on_bytes
        self.on_shard_done = on_shard_done
        self._shard = -1
        self._pos = 0  # index of the next tensor within the current shard
        self._fd: int | None = None
        self._written = 0

    def _open_next(self) -> None:
        self._close_current()
        self._shard += 1
        self._pos = 0
        shard = self.shards[self._shard]
        header, _ = build_header([(t.name, t.dtype, t.shape) for t in shard], ST_METADATA)
        path = self.out_dir / self.names[self._shard]
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._write_all(memoryview(header))

    def _close_current(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self.on_shard_done(self.out_dir / self.names[self._shard])

    def _write_all(self, data: memoryview) -> None:
        while len(data):
            n = os.write(self._fd, data[: 1 << 30])
            data = data[n:]

    def write(self, name: str, data: memoryview | RawRange) -> None:
        if self._fd is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        expected = self.shards[self._shard][self._pos]
        if expected.name != name:
            raise RuntimeError(f"writer got {name!r}, the plan expects {expected.name!r}")  # a bug, not user error
        if isinstance(data, RawRange):
            size = data.end - data.begin
            self._copy_range(data)
        else:
            size = len(data)
            self._write_all(data)
        if size != expected.nbytes:
            raise RuntimeError(f"{name}: wrote {size} bytes, the plan says {expected.nbytes}")
        self._pos += 1
        self.on_bytes(size)

    def _copy_range(self, r: RawRange) -> None:
        with open(r.path, "rb") as src:
            offset, left = r.begin, r.end - r.begin
            while left:
                n = os.copy_file_range(src.fileno(), self._fd, min(left, _COPY_CHUNK), offset)
                if n == 0:
                    raise ConversionError(f"{r.path}: file ended early (truncated source?)")
                offset += n
                left -= n
                self.on_bytes(0)  # keeps the progress display alive on huge tensors

    def close(self) -> None:
        done = self._shard + 1 == len(self.shards) and self._pos == len(self.shards[self._shard])
        if not done:
            raise RuntimeError("writer closed before every planned tensor was written")
        self._close_current()
        index = index_json(self.shards)
        if index is not None:
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

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
