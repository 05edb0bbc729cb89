"""Fuzzing the inputs the converter parses itself: safetensors headers and config.json values.
Whatever the bytes, `gqa-convert` exits 0 with a valid output or exits 2 with one line —
never a traceback, never a hang (each example runs under an alarm), never a touched source."""

from __future__ import annotations

import json
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from conftest import make_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gqa_convert.cli import app, normalize_argv
from gqa_convert.io.safetensors_format import read_header

runner = CliRunner()
SECONDS = 30  # per example; a tiny model converts in well under a second


@contextmanager
def alarm(seconds: int):
    def hang(signum, frame):
        raise AssertionError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_PRISTINE: dict[str, bytes] = {}


def pristine_files() -> dict[str, bytes]:
    """A tiny valid checkpoint as bytes (built once; not a test argument, so a failing example
    is reported by its mutation alone)."""
    if not _PRISTINE:
        with tempfile.TemporaryDirectory() as d:
            src, _ = make_checkpoint(Path(d), "llama", max_shard_size="1GB")
            _PRISTINE.update({p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})
    return dict(_PRISTINE)


def run_on(files: dict[str, bytes]) -> int:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
        before = {n: (src / n).read_bytes() for n in files}
        with alarm(SECONDS):
            r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "-o", str(Path(d) / "out"), "-q"]))
        assert r.exception is None or isinstance(r.exception, SystemExit), f"traceback: {r.exception!r}"
        assert r.exit_code in (0, 2), r.output
        assert {n: (src / n).read_bytes() for n in files} == before, "the source is never touched"
        if r.exit_code == 2:
            lines = [x for x in r.output.strip().splitlines() if x.strip()]
            assert r.output.startswith("error:") and "Traceback" not in r.output, r.output
            assert len(" ".join(lines)) < 2000, "messages stay bounded"
            assert not (Path(d) / "out").exists()
        else:
            out = Path(d) / "out"
            for shard in out.glob("*.safetensors"):
                read_header(shard)  # every output shard is valid safetensors
            cfg = json.loads((out / "config.json").read_text())
            assert cfg["num_key_value_heads"] == 2
        return r.exit_code


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header_text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + data


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def header_mutation(draw):
    kind = draw(
        st.sampled_from(
            ["dtype", "shape", "offsets", "entry", "metadata", "extra", "length", "truncate", "dup", "bytes"]
        )
    )
    return kind, draw(json_values), draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 10**6))


@settings(max_examples=60, deadline=None)
@given(header_mutation())
def test_fuzzed_safetensors_header(mutation):
    kind, value, number, cut = mutation
    files = pristine_files()
    raw = files["model.safetensors"]
    header, data = _split(raw)
    name = sorted(k for k in header if k != "__metadata__")[cut % (len(header) - 1)]
    if kind in ("dtype", "shape", "offsets"):
        header[name][{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]] = value
    elif kind == "entry":
        header[name] = value
    elif kind == "metadata":
        header["__metadata__"] = value
    elif kind == "extra":
        header[f"extra.{cut}"] = value
    text = json.dumps(header, allow_nan=True).encode()
    if kind == "dup":
        text = text[:-1] + b"," + json.dumps(name).encode() + b":" + json.dumps(header[name]).encode() + b"}"
    blob = _join(text, data)
    if kind == "length":
        blob = struct.pack("<Q", number) + blob[8:]
    elif kind == "truncate":
        blob = blob[: cut % len(blob)]
    elif kind == "bytes":
        pos = 8 + cut % (len(blob) - 8)
        blob = blob[:pos] + bytes([number % 256]) + blob[pos + 1 :]
    files["model.safetensors"] = blob
    run_on(files)


CONFIG_KEYS = [
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "hidden_size",
    "head_dim",
    "model_type",
    "tie_word_embeddings",
    "partial_rotary_factor",
    "rope_parameters",
    "quantization_config",
    "initializer_range",
    "max_position_embeddings",
]
counts = st.integers(-3, 40) | st.sampled_from([10**9, 10**10, 2**63, 0]) | st.floats(allow_nan=True) | json_values


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), counts, min_size=1, max_size=3))
def test_fuzzed_config_values(changes):
    files = pristine_files()
    cfg = json.loads(files["config.json"])
    cfg.update(changes)
    files["config.json"] = json.dumps(cfg, allow_nan=True).encode()
    run_on(files)


def test_a_deeply_nested_config_is_one_line():
    files = pristine_files()
    files["config.json"] = b"[" * 200_000 + b"]" * 200_000
    run_on(files)


def test_float_configs_are_not_truncated_into_counts():
    files = pristine_files()
    cfg = json.loads(files["config.json"])
    cfg["num_hidden_layers"] = 2.0  # a float is not a count, even when whole
    files["config.json"] = json.dumps(cfg).encode()
    assert run_on(files) == 2
