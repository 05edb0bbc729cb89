"""SHA-256 without a second pass over the data: the converter feeds every byte it reads
and writes through `Hashes`, whose updates run on worker threads (hashlib releases the
GIL), overlapping the file I/O. `sha256_file` is for files read outside that stream.

Buffers are reused (a fresh 16 MB object per chunk costs page faults and zero-filling in
the kernel), so `Hashes` keeps track of which pending updates read which buffer:
`release(buffer)` returns once nothing queued still reads it."""

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


def _owner(data: bytes | bytearray | memoryview) -> int:
    return id(data.obj) if isinstance(data, memoryview) else id(data)


class Hashes:
    """Named running SHA-256 digests, updated off the main thread."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256")
        self._digests: dict[str, hashlib._Hash] = {}
        self._pending: dict[str, Future[None]] = {}
        self._readers: dict[int, list[Future[None]]] = {}  # buffer id -> updates queued on it

    def feed(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` for digest `key`; updates of one digest stay in order. `data` must
        not be modified until `release(data)` or `wait(key)` has returned."""
        h = self._digests.setdefault(key, hashlib.sha256())
        prev = self._pending.get(key)
        if prev is not None:
            prev.result()  # keep at most one chunk per digest in flight, in order
        fut = self._pool.submit(h.update, data)
        self._pending[key] = fut
        readers = self._readers.setdefault(_owner(data), [])
        readers[:] = [f for f in readers if not f.done()]
        readers.append(fut)

    def release(self, buffer: bytes | bytearray | memoryview) -> None:
        """Wait until no queued update still reads `buffer` (so it may be overwritten)."""
        for fut in self._readers.pop(_owner(buffer), []):
            fut.result()

    def wait(self, key: str) -> None:
        f = self._pending.pop(key, None)
        if f is not None:
            f.result()

    def hexdigest(self, key: str) -> str:
        self.wait(key)
        return self._digests[key].hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._readers.clear()

    def __enter__(self) -> Hashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
