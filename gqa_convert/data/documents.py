"""The one document reader for verify, calibration and uptraining.

A data argument is a plain text file, a JSON Lines file (.jsonl/.json, one object per line
with a text field), or `wikitext-2` through `datasets`. Plain text is split into documents
by one rule everywhere: on every occurrence of `separator` when one is given (anywhere in
a line, e.g. '<|endoftext|>'), else on blank lines. Documents are stripped; empty ones are
dropped. Files are streamed, so their size is bounded by the disk, not by memory.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError, shown

WIKITEXT = "wikitext-2"
_BLANK_LINES = re.compile(r"\n\s*\n")
_CHUNK = 1 << 20  # bytes read at a time
MAX_DOCUMENT_CHARS = 1 << 24  # a longer document is cut into pieces of this size
MAX_JSON_LINE = 1 << 26


@dataclass(frozen=True)
class DataSource:
    """One data argument as the user gave it, with what identifies its content."""

    spec: str
    sha256: str
    bytes: int


def _is_wikitext(spec: str) -> bool:
    return spec == WIKITEXT and not Path(spec).exists()


def check_data(specs: list[str], what: str = "--data") -> None:
    """Refuse, before any work, a data argument that is not a readable regular file."""
    if not specs:
        raise ConversionError(f"give {what} FILE (plain text, .jsonl, or wikitext-2)")
    for spec in specs:
        if _is_wikitext(spec):
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConversionError(f"{spec}: no such data file")
        if not path.is_file():
            raise ConversionError(f"{spec}: not a regular file (a directory, device or FIFO); give a text file")


def _check_separator(separator: str | None) -> None:
    if separator is not None and not separator:
        raise ConversionError("--separator must not be empty (leave it out to split on blank lines)")


def _text_chunks(path: Path, spec: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while True:
            raw = f.read(_CHUNK)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError:
                raise ConversionError(f"{spec}: not UTF-8 text; give a text file") from None
            if "\x00" in text:
                raise ConversionError(f"{spec}: holds NUL bytes: a binary file, not text")
            if text:
                yield text
            if not raw:
                return


def split_documents(chunks: Iterator[str], separator: str | None) -> Iterator[str]:
    """Documents from a stream of text pieces, by the module's one rule."""
    _check_separator(separator)
    pattern = re.compile(re.escape(separator)) if separator else _BLANK_LINES
    keep = len(separator) if separator else 2  # a separator may straddle two pieces
    buf = ""
    for chunk in chunks:
        buf += chunk
        parts = pattern.split(buf)
        buf = parts.pop()
        for part in parts:
            if part.strip():
                yield part.strip()
        while len(buf) > MAX_DOCUMENT_CHARS:  # no separator for a long while: cut, keeping a tail
            cut = len(buf) - keep
            if buf[:cut].strip():
                yield buf[:cut].strip()
            buf = buf[cut:]
    if buf.strip():
        yield buf.strip()


def _jsonl(path: Path, spec: str, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_JSON_LINE):
            lineno += 1
            if len(raw) == MAX_JSON_LINE and not raw.endswith(b"\n"):
                raise ConversionError(f"{spec}:{lineno}: a line longer than {MAX_JSON_LINE} bytes")
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                raise ConversionError(f"{spec}:{lineno}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ConversionError(f"{spec}:{lineno}: no string field {shown(field)} (choose it with --text-field)")
            if row[field].strip():
                yield row[field].strip()


def _wikitext(split: str) -> list[str]:
    """WikiText-2 raw through `datasets` (network or HF_DATASETS cache). For a local copy,
    pass the text file instead, e.g. ../shared/data/wikitext-2-raw-test.txt."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ConversionError(
            "--data wikitext-2 needs the `datasets` package (pip install 'gqa-convert[data]'), "
            "or pass a local text copy of WikiText-2 as --data FILE"
        ) from None
    try:
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # datasets raises many types when offline
        raise ConversionError(
            f"cannot load wikitext-2 ({type(e).__name__}); offline? pass a local text copy as --data FILE"
        ) from None
    return list(split_documents(iter(["".join(ds["text"])]), None))


def read_documents(
    spec: str, *, separator: str | None = None, text_field: str = "text", split: str = "test"
) -> Iterator[str]:
    """The documents of one data argument, streamed."""
    if _is_wikitext(spec):
        yield from _wikitext(split)
        return
    check_data([spec])
    path = Path(spec).expanduser()
    if path.suffix in (".jsonl", ".json"):
        yield from _jsonl(path, spec, text_field)
    else:
        yield from split_documents(_text_chunks(path, spec), separator)


def iter_documents(
    specs: list[str], *, separator: str | None = None, text_field: str = "text", split: str = "test"
) -> Iterator[str]:
    """Documents from every data argument, in order; a file with no text is an error."""
    _check_separator(separator)
    for spec in specs:
        empty = True
        for doc in read_documents(spec, separator=separator, text_field=text_field, split=split):
            empty = False
            yield doc
        if empty:
            raise ConversionError(f"{spec}: holds no text")


def describe(spec: str) -> DataSource:
    """SHA-256 and size of one data argument (the whole file, whatever part of it was used)."""
    if _is_wikitext(spec):
        raw = "\n\n".join(_wikitext("test")).encode()
        return DataSource(spec, hashlib.sha256(raw).hexdigest(), len(raw))
    h, n = hashlib.sha256(), 0
    with open(Path(spec).expanduser(), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return DataSource(spec, h.hexdigest(), n)
