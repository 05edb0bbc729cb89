"""SHA-256 of whole files in background threads (hashlib releases the GIL), so hashing
the source and the written shards overlaps the conversion instead of adding to it."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path, cancel: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancel is not None and cancel.is_set():
                return ""
            h.update(view[:n])
    return h.hexdigest()


class BackgroundHasher:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256")
        self._cancel = threading.Event()
        self._futures: dict[str, Future[str]] = {}

    def submit(self, path: Path, key: str | None = None) -> None:
        self._futures[key or path.name] = self._pool.submit(sha256_file, path, self._cancel)

    def results(self) -> dict[str, str]:
        return {k: f.result() for k, f in self._futures.items()}

    def close(self) -> None:
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
