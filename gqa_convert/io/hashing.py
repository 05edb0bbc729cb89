"""SHA-256 without a second pass over the data: the converter feeds every byte it reads
and writes through `Hashes`, whose updates run on worker threads (hashlib releases the
GIL), overlapping the file I/O. `sha256_file` is for files read outside that stream."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class Hashes:
    """Named running SHA-256 digests, updated off the main thread."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256")
        self._digests: dict[str, hashlib._Hash] = {}
        self._pending: dict[str, Future[None]] = {}

    def feed(self, key: str, data: bytes | memoryview) -> None:
        """Queue `data` for digest `key`; updates of one digest stay in order. `data` must
        not be modified until `wait(key)` (bytes objects are immutable, so pass those)."""
        h = self._digests.setdefault(key, hashlib.sha256())
        prev = self._pending.get(key)
        if prev is not None:
            prev.result()  # keep at most one chunk per digest in flight, in order
        self._pending[key] = self._pool.submit(h.update, data)

    def wait(self, key: str) -> None:
        f = self._pending.pop(key, None)
        if f is not None:
            f.result()

    def hexdigest(self, key: str) -> str:
        self.wait(key)
        return self._digests[key].hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Hashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
