"""Reading a source safetensors file front to back exactly once, hashing every byte on
the way, so the manifest's source hashes cost no second pass over the checkpoint.

Bytes land in a small ring of reused buffers (no fresh allocation per chunk), or in the
caller's own buffers (`into`: the writer's staging buffers, for untouched tensors); a buffer is
overwritten only once every hash update that reads it has finished (`Hashes.release`). The
consumer must be done with a ring chunk when it asks for the next.

Where the filesystem allows it, blocks that are not in the page cache are read with
O_DIRECT, instead of the kernel filling freshly allocated page-cache pages and copying them
out (pages never read again: a cold 1.1B conversion here spent 4.2 s of kernel CPU on reads
buffered, 0.6 s direct). They are read ahead of the consumer, 32 MB at a time on a thread of
their own (`_ReadAhead`), so that the disk always has a read to serve while the main thread
converts, copies and writes; the consumer copies each piece out of the block that holds it.
(Reading each 4 MB piece directly into its buffer when asked left the disk idle for reads
while the main thread worked: a cold 7B-shaped conversion took 1.27-1.31x as long.) A block whose
pages are all cached (a warm cache, or what the start-up read-ahead hint of `launch.py`
brought in) is copied from the cache as before: reading it from the disk again would cost a
slow disk its whole time. A source wholly in the cache never starts the thread."""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConversionError
from .hashing import CHUNK, Hashes
from .writer import ALIGN  # O_DIRECT offsets, lengths and buffer addresses are multiples of this

RING = 3  # buffers: one being read into, one being written out, one still being hashed
AHEAD_BLOCK = 32 * 1024 * 1024  # read-ahead: bytes a direct read asks for (a multiple of ALIGN)
AHEAD_SLOTS = 4  # read-ahead: blocks read before the consumer asks for them, at most
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


class _ReadAhead:
    """Reads a file's blocks ahead of its one sequential consumer, on a thread of its own, so
    that the disk always has a read to serve while the consumer converts, copies and writes.
    A block with any page missing from the page cache is read with O_DIRECT into one of
    AHEAD_SLOTS reused buffers; a block wholly cached (or of unknown residency) is left to the
    consumer, which copies it from the cache. A slot is read into again only once the
    consumer has moved past its block. Started at the first block the consumer asks for."""

    def __init__(self, dfd: int, res: _Residency, size: int, start: int) -> None:
        self._dfd, self._res, self._size = dfd, res, size
        self.block_bytes, self._n_slots = AHEAD_BLOCK, AHEAD_SLOTS
        self._slots = [mmap.mmap(-1, self.block_bytes) for _ in range(self._n_slots)]  # page-aligned
        self._cond = threading.Condition()
        self._ready: dict[int, int | OSError | None] = {}  # block -> bytes read, the error, or None: cached
        self._next = self._low = start // self.block_bytes  # the next block to read; the first the consumer still needs
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        size, bb = self._size, self.block_bytes
        blocks = -(-size // bb)
        while True:
            with self._cond:
                while not self._closed and self._next - self._low >= self._n_slots:
                    self._cond.wait()
                if self._closed or self._next >= blocks:
                    return
                b = self._next
                self._next += 1
            begin = b * bb
            end = min(size, begin + bb)
            got: int | OSError | None = None
            if self._res.cached(begin, end) is False:
                length = min(bb, -(-(end - begin) // ALIGN) * ALIGN)
                try:
                    got = self._pread_direct(memoryview(self._slots[b % self._n_slots])[:length], begin)
                except OSError as err:
                    got = err
            with self._cond:
                self._ready[b] = got
                self._cond.notify_all()

    def _pread_direct(self, view: memoryview, offset: int) -> int:
        """Read into `view` from `offset` directly; the count read. A short read (the file's
        end) is not retried: the rest would start at an unaligned offset."""
        got = 0
        while got < len(view):
            n = os.preadv(self._dfd, [view[got:]], offset + got)
            got += n
            if not n or got % ALIGN:
                break
        return got

    def block(self, b: int) -> memoryview | OSError | None:
        """Block b's bytes as read directly (a view of its slot, valid until `release`), the
        error its read met, or None where it is to be read from the cache."""
        with self._cond:
            if b < self._low:
                raise RuntimeError(f"read-ahead: block {b} asked for after its release")
            if b >= self._low + self._n_slots:  # would wait forever: the thread waits for a release
                raise RuntimeError(f"read-ahead: block {b} asked for before block {self._low} was released")
            while b not in self._ready:
                if b * self.block_bytes >= self._size or not self._thread.is_alive():
                    return None  # past the size it was started with (the file grew): from the cache
                self._cond.wait(1.0)
            got = self._ready[b]
        return memoryview(self._slots[b % self._n_slots])[:got] if isinstance(got, int) else got

    def release(self, upto: int) -> None:
        """The consumer needs nothing before file offset `upto` any more."""
        b = upto // self.block_bytes
        with self._cond:
            if b > self._low:
                for k in range(self._low, b):
                    self._ready.pop(k, None)
                self._low = b
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._slots = []  # unmapped once no view of them is left (a caller's may be, until it lets go)


def _uninitialized(size: int) -> bytearray | memoryview:
    """A writable buffer of `size` bytes, not zeroed first: every byte of it that is used is
    read into (bytearray zero-fills: ~0.1 s of memset for a 1.1B model's attention tensors).
    Memory from torch's allocator, exported through numpy; a bytearray without numpy."""
    import torch

    try:
        return memoryview(torch.empty(size, dtype=torch.uint8).numpy())
    except (RuntimeError, ImportError):  # torch built without numpy, or numpy absent
        return bytearray(size)


class SequentialReader:
    def __init__(self, path: Path, hashes: Hashes) -> None:
        self.path = path
        self.hashes = hashes
        self.key = "in/" + path.name
        self.known = hub_blob_digest(path)  # a hub blob is named by its hash: not hashed again
        # non-blocking, so that a FIFO put in the file's place since it was checked cannot hang
        # the open (it has no effect on a regular file's reads); anything but a regular file is
        # refused here (a device such as /dev/zero would never end)
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._dfd: int | None = None
        self._res: _Residency | None = None
        self._ahead: _ReadAhead | None = None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            self._fd = -1
            raise ConversionError(
                f"{path}: is no longer a regular file (replaced while converting?); check the source."
            )
        self._size = st.st_size
        try:
            self._dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            d = os.fstat(self._dfd)
            if (d.st_dev, d.st_ino) != (st.st_dev, st.st_ino):  # the path names another file now
                self._no_direct()
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
        self._ring = [mmap.mmap(-1, CHUNK) for _ in range(RING)]
        self._next = 0
        self.direct_bytes = 0

    def _ended_early(self) -> ConversionError:
        return ConversionError(f"{self.path}: file ended early (truncated?); fetch it again.")

    def _read_failed(self, err: OSError) -> ConversionError:
        return ConversionError(
            f"{self.path}: reading failed ({err.strerror or err}); check the disk, or fetch the file again."
        )

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

    def _pread(self, view: memoryview, offset: int) -> int:
        """_pread_all through the buffered descriptor; an I/O error names the source file."""
        try:
            return self._pread_all(self._fd, view, offset)
        except OSError as err:
            raise self._read_failed(err) from None

    def _fill(self, buf: bytearray | memoryview | mmap.mmap, at: int, begin: int, n: int) -> memoryview:
        """Read the n bytes at file offset `begin` into buf[at:]; their view. Where direct
        reads are possible they come from the read-ahead: copied from its slots where it read
        a block directly, from the page cache where the block is cached."""
        view = memoryview(buf)[at : at + n]
        if self._ahead is None and self._dfd is not None and self._res is not None:
            if self._res.cached(begin, begin + n) is False:  # the first piece not in the cache
                self._ahead = _ReadAhead(self._dfd, self._res, self._size, begin)
        if self._ahead is not None:
            pos, end, bb = begin, begin + n, self._ahead.block_bytes
            while pos < end:
                b = pos // bb
                stop = min(end, (b + 1) * bb)
                got = self._ahead.block(b)
                if isinstance(got, OSError):
                    if got.errno != errno.EINVAL:
                        raise self._read_failed(got)
                    self._no_direct()  # refused after all: buffered from here on
                    break
                off = pos - b * bb
                if got is not None and len(got) >= off + stop - pos:
                    view[pos - begin : stop - begin] = got[off : off + stop - pos]
                    self.direct_bytes += stop - pos
                # cached, or past where the block's read ended (the file grew since it was
                # opened, or shrank: the buffered read tells which): from the cache
                elif self._pread(view[pos - begin : stop - begin], pos) < stop - pos:
                    raise self._ended_early()
                pos = stop
                self._ahead.release(pos)  # block by block: a piece may span more blocks than there are slots
            else:
                return view
            begin, view = pos, view[pos - begin :]  # what is left, buffered
        if self._pread(view, begin) < len(view):
            raise self._ended_early()
        return memoryview(buf)[at : at + n]

    def _no_direct(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
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
            view = self._take(buf, 0, min(n, CHUNK))
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

    def into(self, begin: int) -> Callable[[memoryview], memoryview]:
        """For bytes from `begin` on that go into the caller's buffers (ShardWriter.write_read):
        skips to `begin` (hashing what is skipped) and returns a function that fills a whole
        buffer with the next bytes, hashed, and returns it. The caller must not change a buffer
        before `Hashes.release(buffer)` has returned."""
        self._skip_to(begin)
        return lambda view: self._take(view, 0, len(view))

    def read_into_new(self, begin: int, end: int) -> memoryview:
        """The bytes [begin, end) in one buffer of their own, read once (no join, no copy)."""
        self._skip_to(begin)
        n = end - begin
        buf = _uninitialized(n)
        for off in range(0, n, CHUNK):
            self._take(buf, off, min(CHUNK, n - off))
        return memoryview(buf)[:n]

    def finish(self) -> str:
        """Hash the rest of the file; returns the file's SHA-256."""
        if self.known is not None:  # nothing left to hash: the rest need not be read
            self.close()
            return self.known
        size = os.fstat(self._fd).st_size
        for _ in self._read(max(0, size - self._pos)):
            pass
        pos = self._pos
        try:
            while chunk := os.pread(self._fd, CHUNK, pos):  # a file that grew while it was read
                self.hashes.feed(self.key, chunk)
                pos += len(chunk)
        except OSError as err:
            raise self._read_failed(err) from None
        self.close()
        return self.hashes.hexdigest(self.key)

    def close(self) -> None:
        self._no_direct()  # the read-ahead first: it asks the residency mapping
        if self._res is not None:
            self._res.close()
            self._res = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
