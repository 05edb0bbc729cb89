"""Reading a source safetensors file front to back exactly once, hashing every byte on
the way, so the manifest's source hashes cost no second pass over the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import ConversionError
from .hashing import CHUNK, Hashes


class SequentialReader:
    def __init__(self, path: Path, hashes: Hashes) -> None:
        self.path = path
        self.hashes = hashes
        self.key = "in/" + path.name
        self._f = open(path, "rb", buffering=0)
        self._pos = 0

    def _read(self, n: int) -> Iterator[bytes]:
        while n:
            chunk = self._f.read(min(n, CHUNK))
            if not chunk:
                raise ConversionError(f"{self.path}: file ended early (truncated?); fetch it again.")
            self.hashes.feed(self.key, chunk)
            self._pos += len(chunk)
            n -= len(chunk)
            yield chunk

    def chunks(self, begin: int, end: int) -> Iterator[bytes]:
        """The bytes [begin, end) in chunks; anything skipped before `begin` is hashed too."""
        if begin < self._pos:
            raise RuntimeError(f"{self.path}: read out of order ({begin} < {self._pos})")
        for _ in self._read(begin - self._pos):
            pass
        yield from self._read(end - begin)

    def finish(self) -> str:
        """Hash the rest of the file; returns the file's SHA-256."""
        while chunk := self._f.read(CHUNK):
            self.hashes.feed(self.key, chunk)
        self._f.close()
        return self.hashes.hexdigest(self.key)

    def close(self) -> None:
        self._f.close()
