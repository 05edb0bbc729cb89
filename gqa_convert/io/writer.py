"""Streaming safetensors shards: every header is computed from the plan up front, then
tensor bytes are appended as they become ready. Nothing is buffered beyond the tensor
being written (and two 16 MB staging buffers), so peak memory does not depend on shard or
model size.

Shards are written with O_DIRECT where the filesystem allows it: bytes go from a staging
buffer to the disk, not through the page cache. A buffered write costs a kernel copy into
freshly allocated page-cache pages (on the 2-core test machine about 2 s of CPU per GB,
four times what reading costs) and writeback later; with O_DIRECT the CPU cost of writing
is the copy into the staging buffer, and for an untouched tensor not even that: the source is
read straight into the staging buffer (`write_read`). Writes run on a thread of their own, overlapping the
reading and hashing of what comes next. Where O_DIRECT is refused (tmpfs, some FUSE
filesystems) the writer falls back to buffered writes with early writeback."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from .hashing import CHUNK, Hashes
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

STAGE = 16 * 1024 * 1024  # bytes per direct write (a multiple of ALIGN)
ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this


class DirectFile:
    """Appends to a file opened with O_DIRECT through two aligned staging buffers: one is
    filled while the other is written by a background thread. `finish` writes the tail
    (padded to ALIGN, then truncated back) and waits; the caller still fsyncs.

    Bytes get into a staging buffer either copied (`append`) or read there by the caller
    (`reserve`, then `commit`), which saves a copy of every untouched byte. Whatever the caller
    has queued for hashing from a staging buffer is waited for (`release`) before the buffer is
    filled again."""

    def __init__(self, fd: int, release: Callable[[object], None] = lambda buf: None) -> None:
        self.fd = fd
        self._release = release
        self._bufs = [mmap.mmap(-1, STAGE) for _ in range(2)]  # anonymous maps are page-aligned
        self._views = [memoryview(b) for b in self._bufs]
        self._pending: list[Future[None] | None] = [None, None]
        self._cur = 0
        self._fill = 0  # bytes in the current buffer
        self._offset = 0  # file offset of the current buffer's first byte
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-write")

    @staticmethod
    def probe(fd: int) -> bool:
        """Whether direct writes work on this file (the block written is overwritten later)."""
        block = mmap.mmap(-1, ALIGN)
        try:
            return os.pwrite(fd, block, 0) == ALIGN
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        finally:
            block.close()

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._to_buffered():
                    raise
                continue  # the same bytes again, buffered: the real error (if any) shows there
            view, offset = view[n:], offset + n

    def _to_buffered(self) -> bool:
        """Turn O_DIRECT off for the rest of the file, after a direct write was refused
        mid-file (a file-size limit cuts a write to an unaligned length, which O_DIRECT
        refuses as EINVAL). False if it was already off."""
        import fcntl

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def _submit(self, nbytes: int) -> None:
        """Write the current buffer's first `nbytes` (a multiple of ALIGN) in the background."""
        view = self._views[self._cur][:nbytes]
        self._pending[self._cur] = self._pool.submit(self._pwrite_all, view, self._offset)
        self._offset += nbytes
        self._cur ^= 1
        self._fill = 0
        prev = self._pending[self._cur]  # the buffer about to be filled must be written out first
        if prev is not None:
            self._pending[self._cur] = None
            prev.result()
        self._release(self._bufs[self._cur])  # ... and hashed, where the caller read into it

    def reserve(self, n: int) -> memoryview:
        """Room for the next min(n, what the current staging buffer has left) bytes of the file,
        to be filled by the caller and then `commit`ted (n >= 1)."""
        return self._views[self._cur][self._fill : self._fill + min(n, STAGE - self._fill)]

    def commit(self, n: int) -> None:
        """The first n bytes of the last `reserve` now hold the file's next bytes."""
        self._fill += n
        if self._fill == STAGE:
            self._submit(STAGE)

    def append(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            k = min(len(view), STAGE - self._fill)
            self._views[self._cur][self._fill : self._fill + k] = view[:k]
            self._fill += k
            view = view[k:]
            if self._fill == STAGE:
                self._submit(STAGE)

    def finish(self) -> None:
        try:
            size = self._offset + self._fill
            if self._fill:
                self._submit(-(-self._fill // ALIGN) * ALIGN)  # padded; the padding is cut off below
            self._wait()
            os.ftruncate(self.fd, size)
        finally:
            self.close()

    def _wait(self) -> None:
        for i, fut in enumerate(self._pending):
            self._pending[i] = None
            if fut is not None:
                fut.result()

    def close(self) -> None:
        """Wait for any write in flight (errors ignored: the caller is already failing) and free."""
        for fut in self._pending:
            if fut is not None:
                fut.exception()
        self._pending = [None, None]
        self._pool.shutdown(wait=True)
        for v in self._views:
            v.release()
        for b in self._bufs:
            try:
                b.close()
            except BufferError:  # a failed write's traceback still holds a view: freed with it
                pass


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
        self._direct: DirectFile | None = None
        self.direct = hasattr(os, "O_DIRECT")  # False once a filesystem has refused it
        self._spare: mmap.mmap | None = None  # write_read's buffer where writes are buffered

    @property
    def _key(self) -> str:
        return "out/" + self.names[self._shard]

    def _open_next(self) -> None:
        self._close_current()
        self._shard += 1
        self._pos = 0
        shard = self.shards[self._shard]
        header, _ = build_header([(t.name, t.dtype, t.shape) for t in shard], ST_METADATA)
        path = self.out_dir / self.names[self._shard]
        self._fd = self._open(path)
        self._written = self._flushed = 0
        self._write_all(header)

    def _open(self, path: Path) -> int:
        """A new shard file, for direct writes where they work here."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if self.direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
            else:
                if DirectFile.probe(fd):
                    self._direct = DirectFile(fd, self.hashes.release)
                    return fd
                os.close(fd)
                os.unlink(path)
                self.direct = False
        return os.open(path, flags, 0o644)

    def _close_current(self) -> None:
        if self._fd is not None:
            if self._direct is not None:
                direct, self._direct = self._direct, None
                direct.finish()
            os.fsync(self._fd)  # durable before the directory is renamed into place
            os.close(self._fd)
            self._fd = None
            self.hashes.wait(self._key)

    def _write_all(self, data: bytes | memoryview) -> None:
        self.hashes.feed(self._key, data)
        if self._direct is not None:
            self._direct.append(data)
            return
        view = memoryview(data)
        while len(view):
            n = os.write(self._fd, view[: 1 << 30])
            view = view[n:]
            self._written += n
        if _start_writeback is not None and self._written - self._flushed >= WRITEBACK:
            _start_writeback(self._fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def _expect(self, name: str) -> OutTensor:
        """The planned tensor `name` must come next (its shard opened if it starts one)."""
        if self._fd is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        expected = self.shards[self._shard][self._pos]
        if expected.name != name:
            raise RuntimeError(f"writer got {name!r}, the plan expects {expected.name!r}")  # a bug, not user error
        return expected

    def write_read(self, name: str, nbytes: int, read_into: Callable[[memoryview], object]) -> None:
        """Write tensor `name`, whose nbytes are put into each buffer handed to
        `read_into(view)` (which fills all of it, in order). With direct writes the buffers are the
        staging buffers themselves: the bytes are read where they are written from, never
        copied there. `read_into` may queue hash updates on its view (see DirectFile)."""
        expected = self._expect(name)
        if nbytes != expected.nbytes:
            raise RuntimeError(f"{name}: {nbytes} bytes to write, the plan says {expected.nbytes}")
        left = nbytes
        while left:
            if self._direct is not None:  # read into the staging buffer, hashed there, written from there
                view = self._direct.reserve(min(left, CHUNK))
                read_into(view)
                self.hashes.feed(self._key, view)
                self._direct.commit(len(view))
            else:  # buffered writes: read into a buffer of our own, reused once its hashes are done
                if self._spare is None:
                    self._spare = mmap.mmap(-1, CHUNK)
                self.hashes.release(self._spare)
                view = memoryview(self._spare)[: min(left, CHUNK)]
                read_into(view)
                self._write_all(view)
            left -= len(view)
            self.on_bytes(len(view))
        self._pos += 1

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        expected = self._expect(name)
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
        if self._direct is not None:
            direct, self._direct = self._direct, None
            direct.close()
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
