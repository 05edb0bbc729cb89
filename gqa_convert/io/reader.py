"""Reading a source safetensors file front to back exactly once, hashing every byte on
the way, so the manifest's source hashes cost no second pass over the checkpoint.

Bytes land in a small ring of reused buffers (no fresh allocation per chunk); a buffer is
overwritten only once every hash update that reads it has finished (`Hashes.release`). The
consumer must be done with a chunk when it asks for the next.

Where the filesystem allows it, a piece that is not in the page cache is read with
O_DIRECT: the disk writes it straight into the buffer, instead of the kernel filling
freshly allocated page-cache pages and copying them out (pages never read again: a cold
1.1B conversion here spent 4.2 s of kernel CPU on reads buffered, 0.6 s direct). A
piece whose pages are all cached (a warm cache, or what the start-up read-ahead hint of
`launch.py` brought in) is copied from the cache as before: reading it from the disk
again would cost a slow disk its whole time. Direct reads cover whole aligned blocks
around the piece; only the piece's own bytes are used and hashed."""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConversionError
from .hashing import CHUNK, Hashes
from .writer import ALIGN  # O_DIRECT offsets, lengths and buffer addresses are multiples of this

RING = 3  # buffers: one being read into, one being written out, one still being hashed
PAGE = mmap.PAGESIZE
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESIDENT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of a page's byte says resident, the rest are reserved


def hub_blob_digest(path: Path) -> str | None:
    """The SHA-256 of a file in a Hugging Face cache snapshot, from its name: a snapshot's
    LFS files are links into the repository's blobs/ folder, each blob named by the SHA-256
    of its content. None for anything else (a plain file, a git blob named by SHA-1)."""
    if not path.is_symlink():
        return None
    real = path.resolve()
    in_cache = real.parent.name == "blobs" and path.parent.parent.name == "snapshots"
    return real.name if in_cache and _SHA256.fullmatch(real.name) else None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc with mmap, munmap and mincore typed; None where there is none to load."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
        ]
        libc.mmap.restype = ctypes.c_void_p
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return None
    return libc


class _Residency:
    """Which pages of a file are in the page cache: mincore(2) on a read-only mapping of the
    file that is never touched, so asking reads nothing. Unknown (None) where it cannot be
    asked (no libc, a filesystem that cannot map the file)."""

    def __init__(self, fd: int, size: int) -> None:
        self._libc, self._addr, self._size = _libc(), None, size
        if self._libc is None or size == 0:
            return
        addr = self._libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr not in (None, ctypes.c_void_p(-1).value):
            self._addr = addr

    def cached(self, begin: int, end: int) -> bool | None:
        """Whether every page of [begin, end) is cached; None if unknown."""
        if self._addr is None:
            return None
        first = begin - begin % PAGE
        end = min(end, self._size)
        if end <= first:
            return None
        pages = -(-(end - first) // PAGE)
        vec = ctypes.create_string_buffer(pages)
        if self._libc.mincore(self._addr + first, end - first, vec) != 0:
            return None
        return b"\0" not in vec.raw.translate(_RESIDENT)  # in C: a Python loop over pages cost ~0.15 s a 2.5 GB model

    def close(self) -> None:
        if self._addr is not None:
            self._libc.munmap(self._addr, self._size)
            self._addr = None


def _uninitialized(size: int) -> bytearray | memoryview:
    """A writable buffer of `size` bytes, not zeroed first: every byte of it that is used is
    read into (bytearray zero-fills: ~0.1 s of memset for a 1.1B model's attention tensors).
    Memory from torch's allocator, exported through numpy; a bytearray without numpy."""
    import torch

    try:
        return memoryview(torch.empty(size, dtype=torch.uint8).numpy())
    except (RuntimeError, ImportError):  # torch built without numpy, or numpy absent
        return bytearray(size)


def _aligned(buf: bytearray | memoryview | mmap.mmap) -> int:
    """How many bytes into `buf` its first ALIGN-aligned address lies."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return -addr % ALIGN


class SequentialReader:
    def __init__(self, path: Path, hashes: Hashes) -> None:
        self.path = path
        self.hashes = hashes
        self.key = "in/" + path.name
        self.known = hub_blob_digest(path)  # a hub blob is named by its hash: not hashed again
        self._fd = os.open(path, os.O_RDONLY)
        self._dfd: int | None = None
        self._res: _Residency | None = None
        self._size = os.fstat(self._fd).st_size
        try:
            self._dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except (OSError, AttributeError):  # tmpfs, some FUSE filesystems: buffered reads only
            pass
        if self._dfd is not None:
            self._res = _Residency(self._fd, self._size)
        advice = "POSIX_FADV_SEQUENTIAL" if self._dfd is None else "POSIX_FADV_RANDOM"  # no read-ahead to waste
        try:
            os.posix_fadvise(self._fd, 0, 0, getattr(os, advice))
        except (AttributeError, OSError):
            pass
        self._pos = 0
        self._ring = [mmap.mmap(-1, CHUNK + 2 * ALIGN) for _ in range(RING)]  # page-aligned
        self._next = 0
        self.direct_bytes = 0

    def _ended_early(self) -> ConversionError:
        return ConversionError(f"{self.path}: file ended early (truncated?); fetch it again.")

    @staticmethod
    def _pread_all(fd: int, view: memoryview, offset: int) -> int:
        """Read into all of `view` from `offset`; the count read (short only at the file's end)."""
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                break
            got += n
        return got

    def _fill(self, buf: bytearray | memoryview | mmap.mmap, at: int, begin: int, n: int) -> memoryview:
        """Read the n bytes at file offset `begin` into buf[at:]; their view. The caller sees
        to it that buf's byte at - begin % ALIGN has an aligned address and that the aligned
        blocks around the piece fit (a direct read fills them whole)."""
        if self._dfd is not None and self._res is not None and self._res.cached(begin, begin + n) is False:
            lead = begin % ALIGN
            e = min(-(-(begin + n) // ALIGN) * ALIGN, -(-self._size // ALIGN) * ALIGN)
            whole = memoryview(buf)[at - lead : at - lead + (e - begin + lead)]
            try:
                got = self._pread_all(self._dfd, whole, begin - lead)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._no_direct()  # refused after all: buffered from here on
            else:
                if got < lead + n:
                    raise self._ended_early()
                self.direct_bytes += n
                return whole[lead : lead + n]
        view = memoryview(buf)[at : at + n]
        if self._pread_all(self._fd, view, begin) < n:
            raise self._ended_early()
        return view

    def _no_direct(self) -> None:
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    def _take(self, buf: bytearray | memoryview | mmap.mmap, at: int, n: int) -> memoryview:
        view = self._fill(buf, at, self._pos, n)
        if self.known is None:
            self.hashes.feed(self.key, view)
        self._pos += n
        return view

    def _read(self, n: int) -> Iterator[memoryview]:
        while n:
            buf = self._ring[self._next]
            self._next = (self._next + 1) % RING
            self.hashes.release(buf)
            view = self._take(buf, self._pos % ALIGN, min(n, CHUNK))
            n -= len(view)
            yield view

    def _skip_to(self, begin: int) -> None:
        if begin < self._pos:
            raise RuntimeError(f"{self.path}: read out of order ({begin} < {self._pos})")
        for _ in self._read(begin - self._pos):
            pass

    def chunks(self, begin: int, end: int) -> Iterator[memoryview]:
        """The bytes [begin, end) in chunks (views of reused buffers: each is valid until the
        next is asked for); anything skipped before `begin` is hashed too."""
        self._skip_to(begin)
        yield from self._read(end - begin)

    def read_into_new(self, begin: int, end: int) -> memoryview:
        """The bytes [begin, end) in one buffer of their own, read once (no join, no copy)."""
        self._skip_to(begin)
        n = end - begin
        buf = _uninitialized(n + 3 * ALIGN)
        lead = begin % ALIGN  # at the same offset from an aligned address as in the file
        at = _aligned(buf) + lead
        for off in range(0, n, CHUNK):
            self._take(buf, at + off, min(CHUNK, n - off))
        return memoryview(buf)[at : at + n]

    def finish(self) -> str:
        """Hash the rest of the file; returns the file's SHA-256."""
        if self.known is not None:  # nothing left to hash: the rest need not be read
            self.close()
            return self.known
        size = os.fstat(self._fd).st_size
        for _ in self._read(max(0, size - self._pos)):
            pass
        pos = self._pos
        while chunk := os.pread(self._fd, CHUNK, pos):  # a file that grew while it was read
            self.hashes.feed(self.key, chunk)
            pos += len(chunk)
        self.close()
        return self.hashes.hexdigest(self.key)

    def close(self) -> None:
        if self._res is not None:
            self._res.close()
            self._res = None
        self._no_direct()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
