"""Reading a source safetensors file front to back exactly once, hashing every byte on
the way, so the manifest's source hashes cost no second pass over the checkpoint.

Bytes land in a small ring of reused buffers (`readinto`, no fresh allocation per chunk);
a buffer is overwritten only once every hash update that reads it has finished
(`Hashes.release`). The consumer must be done with a chunk when it asks for the next."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConversionError
from .hashing import CHUNK, Hashes

RING = 3  # buffers: one being read into, one being written out, one still being hashed
_SHA256 = re.compile(r"[0-9a-f]{64}")


def hub_blob_digest(path: Path) -> str | None:
    """The SHA-256 of a file in a Hugging Face cache snapshot, from its name: a snapshot's
    LFS files are links into the repository's blobs/ folder, each blob named by the SHA-256
    of its content. None for anything else (a plain file, a git blob named by SHA-1)."""
    if not path.is_symlink():
        return None
    real = path.resolve()
    in_cache = real.parent.name == "blobs" and path.parent.parent.name == "snapshots"
    return real.name if in_cache and _SHA256.fullmatch(real.name) else None


class SequentialReader:
    def __init__(self, path: Path, hashes: Hashes) -> None:
        self.path = path
        self.hashes = hashes
        self.key = "in/" + path.name
        self.known = hub_blob_digest(path)  # a hub blob is named by its hash: not hashed again
        self._f = open(path, "rb", buffering=0)
        try:
            os.posix_fadvise(self._f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
        except (AttributeError, OSError):
            pass
        self._pos = 0
        self._ring = [bytearray(CHUNK) for _ in range(RING)]
        self._next = 0

    def _fill(self, view: memoryview) -> None:
        """Read exactly len(view) bytes into `view` and hash them."""
        got = 0
        while got < len(view):
            n = self._f.readinto(view[got:])
            if not n:
                raise ConversionError(f"{self.path}: file ended early (truncated?); fetch it again.")
            got += n
        if self.known is None:
            self.hashes.feed(self.key, view)
        self._pos += len(view)

    def _read(self, n: int) -> Iterator[memoryview]:
        while n:
            buf = self._ring[self._next]
            self._next = (self._next + 1) % RING
            self.hashes.release(buf)
            view = memoryview(buf)[: min(n, CHUNK)]
            self._fill(view)
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

    def read_into_new(self, begin: int, end: int) -> bytearray:
        """The bytes [begin, end) in one buffer of their own, read once (no join, no copy)."""
        self._skip_to(begin)
        buf = bytearray(end - begin)
        view = memoryview(buf)
        for off in range(0, len(buf), CHUNK):
            self._fill(view[off : off + CHUNK])
        return buf

    def finish(self) -> str:
        """Hash the rest of the file; returns the file's SHA-256."""
        if self.known is not None:  # nothing left to hash: the rest need not be read
            self._f.close()
            return self.known
        size = os.fstat(self._f.fileno()).st_size
        for _ in self._read(max(0, size - self._pos)):
            pass
        extra = self._f.read(1)  # a file that grew while it was read
        if extra:
            self.hashes.feed(self.key, extra)
            while chunk := self._f.read(CHUNK):
                self.hashes.feed(self.key, chunk)
        self._f.close()
        return self.hashes.hexdigest(self.key)

    def close(self) -> None:
        self._f.close()
