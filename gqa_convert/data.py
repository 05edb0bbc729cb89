"""Evaluation and training text: plain text files (documents separated by blank lines or
an explicit separator), JSON Lines with a text field, or `wikitext-2` through `datasets`.
Used by verify, calibration and uptraining alike."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError

WIKITEXT = "wikitext-2"


@dataclass(frozen=True)
class DataSource:
    """One data argument as the user gave it, with what identifies its content."""

    spec: str
    sha256: str
    bytes: int
    documents: int


def _split_text(text: str, separator: str | None) -> list[str]:
    if separator:
        parts = text.split(separator)
    else:
        parts = re.split(r"\n\s*\n", text)  # blank lines separate documents
    return [p.strip() for p in parts if p.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConversionError(f"{path}:{lineno}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ConversionError(f"{path}:{lineno}: no string field {field!r} (choose it with --text-field)")
            if row[field].strip():
                docs.append(row[field].strip())
    return docs


def _wikitext(split: str = "test") -> list[str]:
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
    return _split_text("".join(ds["text"]), None)


def load_documents(
    specs: list[str], *, separator: str | None = None, text_field: str = "text"
) -> tuple[list[str], list[DataSource]]:
    """Documents from every data argument, in order, and a record of each source."""
    docs: list[str] = []
    sources: list[DataSource] = []
    for spec in specs:
        if spec == WIKITEXT and not os.path.exists(spec):
            part = _wikitext()
            raw = "\n\n".join(part).encode()
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise ConversionError(f"{spec}: no such data file")
            raw = path.read_bytes()
            if path.suffix in (".jsonl", ".json"):
                part = _read_jsonl(path, text_field)
            else:
                try:
                    part = _split_text(raw.decode("utf-8"), separator)
                except UnicodeDecodeError:
                    raise ConversionError(f"{spec}: not UTF-8 text") from None
        if not part:
            raise ConversionError(f"{spec}: holds no text")
        docs.extend(part)
        sources.append(DataSource(spec, hashlib.sha256(raw).hexdigest(), len(raw), len(part)))
    return docs, sources


def iter_documents(specs: list[str], *, separator: str | None = None, text_field: str = "text") -> Iterator[str]:
    """Documents one at a time (for uptraining on files too large to hold)."""
    for spec in specs:
        path = Path(spec).expanduser()
        if spec == WIKITEXT and not path.exists():
            yield from _wikitext("train")
        elif path.suffix in (".jsonl", ".json"):
            yield from _read_jsonl(path, text_field)
        else:
            yield from _iter_text(path, separator)


def _iter_text(path: Path, separator: str | None) -> Iterator[str]:
    buf: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            is_break = line.strip() == separator if separator else not line.strip()
            if is_break:
                if "".join(buf).strip():
                    yield "".join(buf).strip()
                buf = []
            else:
                buf.append(line)
    if "".join(buf).strip():
        yield "".join(buf).strip()
