"""The wider fault matrix (issue 11): a hostile or careless user against every command.

One case per fault found by probing (each failed on the code it was written against; it states
the product's promise, not today's behaviour) and one per important case that already
behaves. The promise, for any input: exit 0 with a correct output, or exit 2 (1 for a
failed verify check) with ONE line starting `error:` -- never a traceback, never a hang,
never a touched source, never a half-written output, never a leaked or deleted file.

Every case asserts the exit code, the message, the source tree's hash and the target's
state. Hangs are bounded by SIGALRM (in-process) or a subprocess timeout."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_fixture, build_model, save_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gqa_convert.cli import app, normalize_argv
from gqa_convert.demo import corpus
from gqa_convert.errors import ConversionError

runner = CliRunner()
HANG_S = 20  # a tiny model answers in a second or two; far longer is a hang


# --- helpers ----------------------------------------------------------------------------------


def tree_hash(path: Path) -> str:
    """Hash of a tree without following links or opening anything but regular files
    (a FIFO in it must not block the hash)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(os.path.relpath(p, path).encode() + b"\0" + str(stat.S_IFMT(st.st_mode)).encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@contextmanager
def deadline(seconds: int = HANG_S):
    def boom(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli(*args, timeout: int = HANG_S):
    with deadline(timeout):
        return runner.invoke(app, normalize_argv([str(a) for a in args]))


def crashed(r) -> bool:
    return r.exception is not None and not isinstance(r.exception, SystemExit)


def describe(r) -> str:
    if crashed(r):
        import traceback

        return "".join(traceback.format_exception(*r.exc_info))[-1500:]
    return r.output[-1500:]


def assert_clean_error(r, code: int | tuple[int, ...] = 2, contains: str | None = None) -> None:
    """Exit `code` with exactly one non-empty line, starting 'error:', and no traceback."""
    codes = code if isinstance(code, tuple) else (code,)
    assert not crashed(r), f"a traceback instead of a message:\n{describe(r)}"
    assert r.exit_code in codes, f"exit {r.exit_code}, expected {codes}:\n{describe(r)}"
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one 'error:' line:\n{r.output[-1500:]}"
    assert "Traceback" not in r.output
    if contains:
        assert contains in lines[0], lines[0]


def assert_ok(r) -> None:
    assert not crashed(r), f"a traceback:\n{describe(r)}"
    assert r.exit_code == 0, describe(r)


def assert_ok_or_clean_error(r, codes=(2,)) -> None:
    if r.exit_code == 0 and not crashed(r):
        return
    assert_clean_error(r, codes)


def subprocess_cli(args, timeout: int = HANG_S, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(
            [sys.executable, "-m", "gqa_convert", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            **kw,
        )
    except subprocess.TimeoutExpired:
        return None, "", ""
    return p.returncode, p.stdout, p.stderr


def safetensors_loads(path: Path) -> bool:
    try:
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    st.get_tensor(k)
        return True
    except Exception:
        return False


def cfg_edit(src: Path, **changes) -> None:
    p = src / "config.json"
    c = json.loads(p.read_text())
    for k, v in changes.items():
        if v is KeyError:
            c.pop(k, None)
        else:
            c[k] = v
    p.write_text(json.dumps(c))


def can_make_read_only(d: Path) -> bool:
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        return True
    os.chmod(d, 0o555)
    return not os.access(d, os.W_OK)


def undo_read_only(d: Path) -> None:
    subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    os.chmod(d, 0o755)


# --- fixtures: tiny checkpoints built once, copied per test -------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-base")
    save_model(build_model("llama"), root / "sharded", max_shard_size="20KB")
    single = save_model(build_model("llama"), root / "single", max_shard_size="10MB")
    corpus.save_tokenizer(single, 32, 64)
    gpt2 = save_model(build_fixture("gpt2"), root / "gpt2", max_shard_size="10MB")
    corpus.save_tokenizer(gpt2, 32, 64)
    (root / "tiny.txt").write_text(" ".join(f"w{i % 32}" for i in range(400)) + "\n")
    r = runner.invoke(app, normalize_argv([str(single), "-g", "2", "-o", str(root / "conv"), "-q"]))
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, normalize_argv([str(gpt2), "-g", "2", "--emulate", "-o", str(root / "gpt2-emu"), "-q"]))
    assert r.exit_code == 0, r.output
    return root


def copy(base: Path, name: str, dest: Path, as_name: str | None = None) -> Path:
    out = dest / (as_name or name)
    shutil.copytree(base / name, out, symlinks=True)
    return out


UP = ["--seq-len", "8", "--batch-size", "2", "--steps", "1", "-q"]  # the cheapest uptrain


# =============================================================================================
# 1. Files in the model directory
# =============================================================================================


def _link_secret(src, tmp):
    (tmp / "secret.txt").write_text("TOP SECRET")
    (src / "notes.txt").symlink_to(tmp / "secret.txt")


def _link_devzero(src, tmp):
    (src / "vocab.txt").symlink_to("/dev/zero")


def _fifo(src, tmp):
    os.mkfifo(src / "added_tokens.txt")


def _socket(src, tmp):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    s.close()


def _dangling(src, tmp):
    (src / "merges.txt").symlink_to(tmp / "nowhere")


def _dir_link_out(src, tmp):
    (tmp / "outside").mkdir()
    (tmp / "outside" / "key.pem").write_text("KEY")
    (src / "extra").symlink_to(tmp / "outside")


def _too_deep(src, tmp):
    d = src
    for i in range(20):
        d = d / f"d{i}"
    d.mkdir(parents=True)
    (d / "x.txt").write_text("x")


@pytest.mark.parametrize(
    "setup",
    [_link_secret, _link_devzero, _fifo, _socket, _dangling, _dir_link_out, _too_deep],
    ids=lambda f: f.__name__.strip("_"),
)
def test_ok_hostile_files_in_model_dir_refused_before_work(base, tmp_path, setup):
    """Already correct: nothing outside the model directory reaches an output."""
    src = copy(base, "single", tmp_path)
    setup(src, tmp_path)
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2)
    assert tree_hash(src) == before and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_single_unindexed_weight_file_that_is_a_fifo_hangs(base, tmp_path):
    """A directory whose only *.safetensors is a FIFO (no model.safetensors, no index)."""
    src = copy(base, "single", tmp_path)
    (src / "model.safetensors").rename(tmp_path / "weights.bak")
    os.mkfifo(src / "weights.safetensors")
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2, "FIFO")
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


def test_local_hub_snapshot_path_is_refused(base, tmp_path):
    """A hub cache snapshot named by its path (files are links into ../../blobs) is a
    legitimate model directory; today every copied file is called 'outside'."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in (base / "single").iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    before = tree_hash(repo)
    r = cli(snap, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_ok(r)
    assert (tmp_path / "o" / "tokenizer.json").is_file() and not (tmp_path / "o" / "tokenizer.json").is_symlink()
    assert tree_hash(repo) == before


# =============================================================================================
# 2. config.json
# =============================================================================================


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_hidden_layers=10**9), "layers"),
        (dict(num_attention_heads=10**10), "disagrees"),
        (dict(hidden_size=10**14), "hidden size"),
        (dict(num_key_value_heads=10**10), "does not divide"),
        (dict(num_hidden_layers="2"), "num_hidden_layers"),
        (dict(num_hidden_layers=float("nan")), "num_hidden_layers"),
        (dict(num_attention_heads=True), "num_attention_heads"),
        (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}), "quantized"),
    ],
    ids=["layers1e9", "heads1e10", "hidden1e14", "kv1e10", "str", "nan", "bool", "quantized"],
)
def test_ok_config_counts_and_types_refused(base, tmp_path, changes, message):
    """Already correct: convert and --dry-run refuse quickly with one line."""
    src = copy(base, "sharded", tmp_path)
    cfg_edit(src, **changes)
    before = tree_hash(src)
    for extra in ([], ["--dry-run"]):
        r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q", *extra)
        assert_clean_error(r, 2, message)
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


def test_inspect_hangs_on_a_huge_head_count(base, tmp_path):
    """valid_groups(10**20, 10**20) walks ~10**10 divisors before anything is checked
    against the tensors (convert and verify refuse it at once; inspect does not)."""
    src = copy(base, "single", tmp_path)
    cfg_edit(src, num_attention_heads=10**20, hidden_size=10**20, num_key_value_heads=KeyError)
    before = tree_hash(src)
    r = cli("inspect", src)
    assert not crashed(r), describe(r)  # a TimeoutError here is the hang
    assert r.exit_code in (0, 2)
    assert tree_hash(src) == before


def test_verify_deeply_nested_tokenizer_config_traceback(base, tmp_path):
    conv = copy(base, "conv", tmp_path)
    (conv / "tokenizer_config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    r = cli("verify", conv, "--no-reference", "--data", base / "tiny.txt", "--max-tokens", "64", "-q")
    assert_clean_error(r, (1, 2))


# =============================================================================================
# 3. Hand-crafted safetensors headers
# =============================================================================================


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    new = edit(header, data)
    if isinstance(new, tuple):
        blob, data = new
    else:
        blob = new
    blob = blob if isinstance(blob, bytes) else json.dumps(blob).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


K0 = "model.layers.0.self_attn.k_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def _meta(value):
    def edit(h, d):
        h["__metadata__"] = value
        return h

    return edit


def _meta_deep(h, d):
    return ('{"__metadata__":' + "[" * 100000 + "]" * 100000 + "," + json.dumps(h)[1:]).encode()


def _alias(h, d):  # k_proj claims q_proj's bytes: overlapping offsets
    h[K0]["data_offsets"] = list(h[Q0]["data_offsets"])
    return h


def _dup_name(h, d):  # k_proj named twice, the second entry pointing at q_proj's bytes
    return (json.dumps(h)[:-1] + f', "{K0}": {json.dumps(h[Q0])}}}').encode()


def _bool_dim(h, d):
    h["model.norm.weight"]["shape"] = [32, True]
    return h


def _gap(h, d):  # every offset shifted: 64 unused bytes before the first tensor
    for k, v in h.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 64, v["data_offsets"][1] + 64]
    return h, b"\0" * 64 + d


def _trailing(h, d):
    return h, d + b"X" * 64


HEADER_FAULTS = {
    "metadata-list": _meta([1, 2]),
    "metadata-str": _meta("abc"),
    "metadata-deep": _meta_deep,
    "overlapping-offsets": _alias,
    "duplicate-name": _dup_name,
    "bool-dimension": _bool_dim,
}


@pytest.mark.parametrize("case", list(HEADER_FAULTS))
def test_convert_malformed_safetensors_header(base, tmp_path, case):
    """Headers safetensors itself refuses: today tracebacks (AttributeError, RecursionError,
    RuntimeError 'read out of order'), or for a bool dimension exit 0 with an output
    safetensors cannot open."""
    src = copy(base, "single", tmp_path)
    _rewrite_header(src / "model.safetensors", HEADER_FAULTS[case])
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    if r.exit_code == 0 and not crashed(r):
        assert safetensors_loads(tmp_path / "o"), "exit 0, but the output is not a valid safetensors checkpoint"
    else:
        assert_clean_error(r, 2, "safetensors")
        assert not (tmp_path / "o").exists()
    assert tree_hash(src) == before


@pytest.mark.parametrize("case", ["metadata-nested", "gap-before-data", "trailing-bytes"], ids=lambda c: c)
def test_ok_convert_headers_safetensors_refuses_give_valid_output(base, tmp_path, case):
    """Already acceptable for convert: exit 0 with a valid output (or a clean refusal)."""
    edit = {"metadata-nested": _meta({"format": {"a": 1}}), "gap-before-data": _gap, "trailing-bytes": _trailing}
    src = copy(base, "single", tmp_path)
    _rewrite_header(src / "model.safetensors", edit[case])
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_ok_or_clean_error(r)
    if r.exit_code == 0:
        assert safetensors_loads(tmp_path / "o")
    assert tree_hash(src) == before


@pytest.mark.parametrize("case", ["metadata-nested", "gap-before-data", "trailing-bytes", "overlapping-offsets"])
def test_verify_checkpoint_that_safetensors_refuses_traceback(base, tmp_path, case):
    """verify's own header check passes these, then transformers' loader raises
    SafetensorError, which load_model does not catch."""
    edit = {
        "metadata-nested": _meta({"format": {"a": 1}}),
        "gap-before-data": _gap,
        "trailing-bytes": _trailing,
        "overlapping-offsets": _alias,
    }
    conv = copy(base, "conv", tmp_path)
    _rewrite_header(conv / "model.safetensors", edit[case])
    before = tree_hash(conv)
    r = cli("verify", conv, "--no-reference", "-q")
    assert_clean_error(r, (1, 2))
    assert tree_hash(conv) == before


@pytest.mark.parametrize("case", ["metadata-str", "metadata-deep"])
def test_inspect_malformed_safetensors_header_traceback(base, tmp_path, case):
    src = copy(base, "single", tmp_path)
    _rewrite_header(src / "model.safetensors", HEADER_FAULTS[case])
    r = cli("inspect", src)
    assert_clean_error(r, 2)


@pytest.mark.parametrize(
    "edit",
    [
        lambda h, d: (h["model.norm.weight"].__setitem__("dtype", "F16"), h)[1],  # size disagrees with dtype
        lambda h, d: (h["model.norm.weight"].__setitem__("shape", [-1, 32]), h)[1],
        lambda h, d: (h["model.norm.weight"].__setitem__("shape", [2**62, 2**62]), h)[1],
        lambda h, d: b"{not json",
        lambda h, d: b"[1, 2, 3]",
        lambda h, d: (h["model.norm.weight"].__setitem__("dtype", "C64"), h)[1],
        lambda h, d: (h.__setitem__(K0, "x"), h)[1],
    ],
    ids=["dtype-size", "negative-shape", "huge-shape", "not-json", "not-object", "unknown-dtype", "entry-str"],
)
def test_ok_malformed_header_refused(base, tmp_path, edit):
    src = copy(base, "single", tmp_path)
    _rewrite_header(src / "model.safetensors", edit)
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2)
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


def test_kv_width_and_rank_not_checked_output_unloadable(base, tmp_path):
    """k_proj [32, 16] (hidden is 32), o_proj with 20 rows, a 3-D v_proj: convert checks
    only axis 0 of K/V and exits 0 with an output transformers cannot load."""
    src = copy(base, "single", tmp_path)
    p = src / "model.safetensors"
    t = load_file(p)
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:, :16].contiguous()
    t["model.layers.1.self_attn.o_proj.weight"] = t["model.layers.1.self_attn.o_proj.weight"][:20].contiguous()
    t["model.layers.1.self_attn.v_proj.weight"] = t["model.layers.1.self_attn.v_proj.weight"].reshape(32, 32, 1)
    save_file(t, p, metadata={"format": "pt"})
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2, "disagrees")
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["int-key", "sparse", "meta-device"])
def test_bin_checkpoint_odd_state_dict_traceback(tmp_path, kind):
    model = build_model("llama")
    src = save_model(model, tmp_path / "src", fmt="bin")
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    if kind == "int-key":
        sd[5] = torch.zeros(3)
    elif kind == "sparse":
        sd["model.norm.weight"] = sd["model.norm.weight"].to_sparse()
    else:
        sd["model.norm.weight"] = torch.empty(32, device="meta")
    torch.save(sd, src / "pytorch_model.bin")
    before = tree_hash(src)
    r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2)
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


def test_ok_index_weight_map_hostile_values(base, tmp_path):
    for value in (5, None, "../x.safetensors", "/etc/passwd", ".", ["a"]):
        src = copy(base, "sharded", tmp_path, as_name=f"s{abs(hash(str(value)))}")
        index = src / "model.safetensors.index.json"
        d = json.loads(index.read_text())
        d["weight_map"][sorted(d["weight_map"])[0]] = value
        index.write_text(json.dumps(d))
        before = tree_hash(src)
        r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
        assert_clean_error(r, 2, "not a plain file name")
        assert tree_hash(src) == before and not (tmp_path / "o").exists()


# =============================================================================================
# 4. Output paths
# =============================================================================================


@pytest.mark.parametrize(
    "live, pattern",
    [("m1", "m*"), ("m1", "m[1]"), ("m1", "m?"), ("m.gqa-tmp-x", "m")],
    ids=["star", "brackets", "question-mark", "literal-prefix"],
)
def test_stale_cleanup_removes_a_live_conversions_temporary_directory(base, tmp_path, live, pattern):
    """A conversion to d/<live> is running (it holds its lock; its temporary directory is
    named with a live pid). A second conversion to d/<pattern> globs `.{pattern}.gqa-tmp-*`
    and removes the live one's directory (the first then fails 'No such file or directory')."""
    parent = tmp_path / "d"
    parent.mkdir()
    live_tmp = parent / f".{live}.gqa-tmp-{os.getpid()}"
    live_tmp.mkdir()
    (live_tmp / "model-00001-of-00002.safetensors").write_bytes(b"half written by a live run")
    lock = parent / f".{live}.gqa-convert.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = cli(base / "single", "-g", "2", "-o", parent / pattern, "-q")
        assert live_tmp.is_dir() and (live_tmp / "model-00001-of-00002.safetensors").read_bytes().startswith(b"half"), (
            "a live conversion's temporary directory was removed"
        )
        assert lock.exists(), "a live conversion's lock was removed"
    assert_ok(r)
    assert (parent / pattern / "model.safetensors").is_file()


def test_output_name_with_double_star_traceback_and_leftover_lock(base, tmp_path):
    parent = tmp_path / "d"
    parent.mkdir()
    r = cli(base / "single", "-g", "2", "-o", parent / "a**", "-q")
    assert_ok_or_clean_error(r)
    assert not (parent / ".a**.gqa-convert.lock").exists(), "the lock was left behind"
    if r.exit_code == 0:
        assert (parent / "a**" / "model.safetensors").is_file()


def test_force_swap_interrupted_loses_the_old_target(base, tmp_path, monkeypatch):
    """SIGINT/SIGTERM between 'rename old target aside' and 'rename new one in': neither is
    at the path, the message says 'nothing was written', and the next run deletes the
    set-aside copy as 'stale'."""
    target = tmp_path / "o"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    real = os.rename

    def rename_then_signal(a, b):
        real(a, b)
        if Path(a) == target:  # the old target has just been set aside
            raise KeyboardInterrupt  # what the SIGINT/SIGTERM handler raises

    import gqa_convert.io.outdir as outdir

    with monkeypatch.context() as m:
        m.setattr(outdir, "_exchange", lambda a, b: False)  # the two-rename path (no RENAME_EXCHANGE)
        m.setattr(os, "rename", rename_then_signal)
        r = cli(base / "single", "-g", "2", "-o", target, "--force", "-q")
    assert r.exit_code == 130 and not crashed(r), describe(r)
    old_back = (target / "keep.txt").is_file() and (target / "keep.txt").read_text() == "old"
    new_in = (target / "model.safetensors").is_file() and (target / "gqa_convert.json").is_file()
    assert old_back or new_in, f"neither the old nor the new target is at {target}: {sorted(os.listdir(tmp_path))}"
    if not new_in:
        assert "left as it was" in " ".join(r.output.split())


def test_force_onto_a_symlinked_target_is_refused_and_leaves_nothing(base, tmp_path):
    """Once: --force replaced the link and left a stale entry. Links are never written through."""
    real = tmp_path / "realdir"
    real.mkdir()
    (real / "k").write_text("keep")
    (tmp_path / "out").symlink_to(real)
    r = cli(base / "single", "-g", "2", "-o", tmp_path / "out", "--force", "-q")
    assert_clean_error(r, 2, "symbolic link")
    assert os.readlink(tmp_path / "out") == str(real) and (real / "k").read_text() == "keep"
    left = [p.name for p in tmp_path.iterdir() if ".gqa-tmp-" in p.name or p.name.endswith(".lock")]
    assert not left, f"left behind: {left}"


def test_dangling_symlink_output_fails_only_after_the_work(base, tmp_path, monkeypatch):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    import gqa_convert.conversion.converter as conv_mod

    def no_streaming(*a, **k):
        raise AssertionError("weights were streamed before --out was found unusable")

    monkeypatch.setattr(conv_mod, "write_weights", no_streaming)
    r = cli(base / "single", "-g", "2", "-o", tmp_path / "out", "-q")
    assert_clean_error(r, 2)
    assert os.readlink(tmp_path / "out") == str(tmp_path / "nowhere")


def test_failed_run_leaves_created_parent_directories(base, tmp_path):
    src = copy(base, "single", tmp_path)
    t = load_file(src / "model.safetensors")
    t["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    r = cli(src, "-g", "2", "-o", tmp_path / "new" / "a" / "b", "-q")
    assert_clean_error(r, 2, "NaN")
    assert not (tmp_path / "new").exists(), f"left behind: {list((tmp_path / 'new').rglob('*'))}"


def test_empty_output_path_with_force_replaces_the_current_directory(base, tmp_path, monkeypatch):
    """`-o "$OUT" --force` with $OUT unset: Path('') is '.', and --force replaces the
    directory the user is working in."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("precious")
    monkeypatch.chdir(proj)
    r = cli(base / "single", "-g", "2", "-o", "", "--force", "-q")
    assert (proj / "notes.txt").is_file() and (proj / "notes.txt").read_text() == "precious", "the cwd was replaced"
    assert_clean_error(r, 2)


@pytest.mark.parametrize("where", ["convert --out", "convert MODEL", "inspect MODEL", "verify --data"])
def test_path_too_long_traceback(base, tmp_path, where):
    long = tmp_path / ("a" * 300)
    args = {
        "convert --out": [base / "single", "-g", "2", "-o", long, "-q"],
        "convert MODEL": [long, "-g", "2", "-q"],
        "inspect MODEL": ["inspect", long],
        "verify --data": ["verify", base / "conv", "--data", long, "-q"],
    }[where]
    r = cli(*args)
    assert_clean_error(r, 2)


def test_read_only_parent_found_only_after_calibration(base, tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    if not can_make_read_only(parent):
        pytest.skip("cannot make a directory read-only here")
    import gqa_convert.conversion.converter as conv_mod

    def calibrated(*a, **k):
        raise AssertionError("calibration ran before the output path was checked")

    monkeypatch.setattr(conv_mod, "_calibrate", calibrated)
    try:
        r = cli(base / "single", "-g", "2", "--method", "fold", "--calib", base / "tiny.txt", "-o", parent / "o", "-q")
        assert_clean_error(r, 2, "cannot write in")
        assert list(parent.iterdir()) == []
    finally:
        undo_read_only(parent)


def test_ok_output_inside_or_containing_source(base, tmp_path):
    src = copy(base, "single", tmp_path)
    before = tree_hash(src)
    for out, force in ((src, False), (src / "sub", False), (tmp_path, True), (src / ".." / src.name / "x", False)):
        r = cli(src, "-g", "2", "-o", out, "-q", *(["--force"] if force else []))
        assert_clean_error(r, 2)
    assert tree_hash(src) == before


# =============================================================================================
# 5. Options
# =============================================================================================


@pytest.mark.parametrize(
    "args",
    [["-g", "abc"], ["-g", "2", "--mqa"], ["-g", "2", "--seed", "1.5"]],
    ids=["groups-not-int", "mqa-and-groups", "seed-float"],
)
def test_usage_errors_are_a_boxed_panel_not_one_error_line(base, tmp_path, args):
    r = cli(base / "single", *args, "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["verify", "{conv}", "--data", "{tiny}", "--max-tokens", "-5"], "--max-tokens"),
        (["verify", "{conv}", "--data", "{tiny}", "--seq-len", "1"], "--seq-len"),
        (["verify", "{conv}", "--data", "{tiny}", "--stride", "0"], "--stride"),
        (["verify", "{conv}", "--data", "{tiny}", "--batch-size", "0"], "--batch-size"),
        (["verify", "{conv}", "--generate", "-1"], "--generate"),
        (["verify", "{conv}", "--data", "{tiny}", "--max-ppl-ratio", "nan"], "--max-ppl-ratio"),
        (["verify", "{conv}", "--device", "cuda:7"], "--device"),
        (["verify", "{conv}", "--device", "banana"], "--device"),
        (["verify", "{conv}", "--device", "meta"], "--device"),
        (["{single}", "-g", "2", "--calib-tokens", "0"], "--calib-tokens"),
        (["{single}", "-g", "2", "--seed", "-1"], "--seed"),
        (["{single}", "-g", "2", "--max-shard-size", "nan"], "--max-shard-size"),
        (["{single}", "-g", "2", "--max-shard-size", "0.1B"], "--max-shard-size"),
        (["uptrain", "{conv}", "--data", "{tiny}", "--out", "{tmp}/u", "--seq-len", "1", "--steps", "1"], "--seq-len"),
        (["uptrain", "{conv}", "--data", "{tiny}", "--out", "{tmp}/u", "--lr", "nan", "--steps", "1"], "--lr"),
        (["uptrain", "{conv}", "--data", "{tiny}", "--out", "{tmp}/u", "--tokens", "inf"], "--tokens"),
        (["uptrain", "{conv}", "--data", "{tiny}", "--out", "{tmp}/u", "--eval-tokens", "1", "--steps", "1"], "--eval"),
        (["uptrain", "{conv}", "--data", "{tiny}", "--out", "{tmp}/u", "--steps", "0"], "--steps"),
        (["uptrain", "{conv}", "--data", "{tiny}", "--out", "{tmp}/u", "--warmup", "-1", "--steps", "1"], "--warmup"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) and len(v) < 3 else None,
)
def test_ok_numeric_option_ranges(base, tmp_path, args, message):
    fill = dict(conv=base / "conv", tiny=base / "tiny.txt", single=base / "single", tmp=tmp_path)
    r = cli(*[a.format(**fill) for a in args], "-q")
    assert_clean_error(r, 2, message)
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("how", ["no-reference", "no-data"])
def test_verify_max_ppl_ratio_silently_passes_when_nothing_is_compared(base, how):
    """`--max-ppl-ratio 0.0001` promises exit 1 above the limit; with no reference (or no
    --data) no ratio is computed and verify exits 0: a CI gate that always passes."""
    args = ["verify", base / "conv", "--max-ppl-ratio", "0.0001", "-q"]
    args += ["--no-reference", "--data", base / "tiny.txt"] if how == "no-reference" else []
    r = cli(*args)
    assert r.exit_code != 0, "exit 0: the perplexity limit was never checked"
    assert_clean_error(r, (1, 2))


def test_verify_seq_len_beyond_learned_positions_traceback(base):
    """GPT-2 has n_positions 64; --seq-len 200 indexes past its position table."""
    r = cli("verify", base / "gpt2-emu", "--no-reference", "--data", base / "tiny.txt", "--seq-len", "200", "-q")
    assert_clean_error(r, 2)


def test_verify_empty_prompt_traceback(base):
    r = cli("verify", base / "conv", "--no-reference", "--generate", "3", "--prompt", "", "-q")
    assert_ok_or_clean_error(r)


def test_verify_long_prompt_beyond_positions_traceback(base):
    r = cli("verify", base / "gpt2-emu", "--no-reference", "--generate", "3", "--prompt", " ".join(["w1"] * 100), "-q")
    assert_ok_or_clean_error(r)


def test_uptrain_seq_len_beyond_learned_positions_traceback(base, tmp_path):
    r = cli(
        "uptrain",
        base / "gpt2-emu",
        "--data",
        base / "tiny.txt",
        "--out",
        tmp_path / "u",
        *UP[:-1][2:],
        "--seq-len",
        "200",
        "-q",
        timeout=60,
    )
    assert_clean_error(r, 2)
    assert not (tmp_path / "u").exists()


# =============================================================================================
# 6. Data files
# =============================================================================================


@pytest.fixture
def data_files(tmp_path) -> dict[str, Path]:
    d = tmp_path / "data"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n\n  \n")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (d / "latin1.txt").write_bytes(b"hello \xff\xfe world\n")
    (d / "nul.txt").write_bytes(b"hello\x00world\n")
    os.mkfifo(d / "fifo.txt")
    (d / "dir.txt").mkdir()
    (d / "bad.jsonl").write_text('{"text": "w1 w2"}\n{bad\n')
    (d / "wrongtype.jsonl").write_text('{"text": 5}\n')
    np.save(d / "empty.npy", np.array([], dtype=np.int64))
    np.save(d / "negative.npy", np.array([-1, 2, 3] * 50))
    np.save(d / "toolarge.npy", np.array([10**6] * 150))
    np.save(d / "object.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    np.save(d / "twod.npy", np.zeros((10, 10), dtype=np.int64))
    np.save(d / "float.npy", np.zeros(150))
    (d / "fake.npy").write_text("not an array")
    return {p.name: p for p in d.iterdir()}


VERIFY_BAD_DATA = ["empty.txt", "blank.txt", "binary.bin", "latin1.txt", "nul.txt", "fifo.txt", "dir.txt"]
VERIFY_BAD_DATA += ["bad.jsonl", "wrongtype.jsonl", "empty.npy"]


def test_ok_verify_and_calib_bad_data_files(base, tmp_path, data_files):
    for name in VERIFY_BAD_DATA:
        r = cli("verify", base / "conv", "--no-reference", "--data", data_files[name], "-q")
        assert_clean_error(r, 2)
    for name in ("empty.txt", "fifo.txt", "binary.bin"):
        r = cli(base / "single", "-g", "2", "--method", "fold", "--calib", data_files[name], "-o", tmp_path / "o", "-q")
        assert_clean_error(r, 2)
        assert not (tmp_path / "o").exists()
    r = cli("verify", base / "conv", "--data", base / "tiny.txt", "--separator", "", "-q")
    assert_clean_error(r, 2, "--separator")


@pytest.mark.parametrize(
    "name", ["empty.npy", "negative.npy", "toolarge.npy", "object.npy", "twod.npy", "float.npy", "fake.npy"]
)
def test_ok_uptrain_bad_token_arrays(base, tmp_path, data_files, name):
    with deadline(60):
        r = cli("uptrain", base / "conv", "--data", data_files[name], "--out", tmp_path / "u", *UP, timeout=60)
    assert_clean_error(r, 2)
    assert not (tmp_path / "u").exists()


def _big_tokenizer(src: Path) -> Path:
    """A tokenizer whose ids (up to 103) run past the model's 64 embeddings, and text using them."""
    corpus.save_tokenizer(src, 100, 64)
    text = src.parent / "high-ids.txt"
    text.write_text(" ".join(f"w{i % 100}" for i in range(400)) + "\n")
    return text


def test_calibration_with_token_ids_beyond_the_vocabulary_traceback(base, tmp_path):
    src = copy(base, "single", tmp_path)
    text = _big_tokenizer(src)
    before = tree_hash(src)
    r = cli(src, "-g", "2", "--method", "fold", "--calib", text, "--calib-tokens", "200", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2)
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


def test_uptrain_text_with_token_ids_beyond_the_vocabulary_traceback(base, tmp_path):
    conv = copy(base, "conv", tmp_path)
    text = _big_tokenizer(conv)
    r = cli(
        "uptrain",
        conv,
        "--data",
        text,
        "--out",
        tmp_path / "u",
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--steps",
        "10",
        "-q",
        timeout=60,
    )
    assert_clean_error(r, 2)
    assert not (tmp_path / "u").exists()


def test_verify_reference_with_a_smaller_vocabulary_traceback(tmp_path):
    conv = save_model(build_model("llama"), tmp_path / "conv", max_shard_size="10MB")
    ref = save_model(build_model("llama", vocab_size=40), tmp_path / "ref", max_shard_size="10MB")
    for d in (conv, ref):
        corpus.save_tokenizer(d, 60, 64)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(300)) + "\n")
    r = cli("verify", conv, "--reference", ref, "--data", text, "-q")
    assert_clean_error(r, 2)


def test_ok_tokenizer_config_auto_map_refused(base, tmp_path):
    conv = copy(base, "conv", tmp_path)
    tc = json.loads((conv / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tok.Evil", None]}
    (conv / "tokenizer_config.json").write_text(json.dumps(tc))
    for args in (
        ["verify", conv, "--no-reference", "--data", base / "tiny.txt", "-q"],
        [conv, "-g", "1", "--method", "fold", "--calib", base / "tiny.txt", "-o", tmp_path / "o", "-q"],
        ["uptrain", conv, "--data", base / "tiny.txt", "--out", tmp_path / "u", *UP],
    ):
        r = cli(*args)
        assert_clean_error(r, 2, "--trust-remote-code")
    assert not (tmp_path / "o").exists() and not (tmp_path / "u").exists()


def test_ok_missing_tokenizer_files(base, tmp_path):
    conv = copy(base, "conv", tmp_path)
    for f in conv.glob("tokenizer*"):
        f.unlink()
    r = cli("verify", conv, "--no-reference", "--data", base / "tiny.txt", "-q")
    assert_clean_error(r, 2, "no tokenizer files")
    r = cli(conv, "-g", "1", "--method", "fold", "--calib", base / "tiny.txt", "-o", tmp_path / "o", "-q")
    assert_clean_error(r, 2, "no tokenizer files")


# =============================================================================================
# 7. Manifests (gqa_convert.json in a converted directory)
# =============================================================================================


def _manifest(conv: Path, edit) -> None:
    p = conv / "gqa_convert.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit",
    [lambda m: m["source"].__setitem__("path", 5), lambda m: m["source"].__setitem__("path", ["a"])],
    ids=["path-int", "path-list"],
)
def test_verify_manifest_source_path_wrong_type_traceback(base, tmp_path, edit):
    conv = copy(base, "conv", tmp_path)
    _manifest(conv, edit)
    r = cli("verify", conv, "-q")
    assert_clean_error(r, 2, "manifest")


def test_ok_manifest_not_json_or_wrong_shape(base, tmp_path):
    conv = copy(base, "conv", tmp_path)
    for bad in ("{not json", "[1]", '{"source": []}', '{"conversion": {"kv_heads_after": "2"}}'):
        (conv / "gqa_convert.json").write_text(bad)
        r = cli("verify", conv, "-q")
        assert_clean_error(r, 2, "manifest")
    r = cli("uptrain", conv, "--data", base / "tiny.txt", "--out", tmp_path / "u", *UP)
    assert_clean_error(r, 2, "manifest")


@pytest.mark.parametrize(
    "edit",
    [lambda m: m.__setitem__("kv_cache", {}), lambda m: m.__setitem__("tool", {})],
    ids=["kv_cache-empty", "tool-empty"],
)
def test_uptrain_damaged_manifest_crashes_after_training(base, tmp_path, edit):
    """model_card() indexes the manifest unchecked when uptrain writes its output: the
    training is done, then KeyError, and nothing is written."""
    conv = copy(base, "conv", tmp_path)
    _manifest(conv, edit)
    r = cli("uptrain", conv, "--data", base / "tiny.txt", "--out", tmp_path / "u", *UP, timeout=60)
    assert_ok_or_clean_error(r)
    if r.exit_code == 0:
        assert (tmp_path / "u" / "model.safetensors").is_file()


def test_uptrain_manifest_emulated_with_negative_groups_traceback(base, tmp_path):
    conv = copy(base, "conv", tmp_path)
    _manifest(conv, lambda m: m["conversion"].update(emulated=True, kv_heads_after=-2))
    r = cli("uptrain", conv, "--data", base / "tiny.txt", "--out", tmp_path / "u", *UP, timeout=60)
    assert_clean_error(r, 2, "manifest")
    assert not (tmp_path / "u").exists()


def test_batch_rerun_with_manifest_saving_not_a_number_traceback(base, tmp_path):
    yml = tmp_path / "jobs.yaml"
    yml.write_text(f"jobs:\n  - {{model: {base / 'single'}, groups: 2, out: out}}\n")
    assert_ok(cli("batch", yml))
    _manifest(tmp_path / "out", lambda m: m["kv_cache"].__setitem__("saving", "abc"))
    r = cli("batch", yml)
    assert not crashed(r), describe(r)
    assert r.exit_code in (0, 1, 2)


# =============================================================================================
# 8. Batch YAML
# =============================================================================================


def _batch(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "jobs.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "out",
    ["{name:x}", "{name!z}", "{groups:d}{name:d}", "{groups:>99999999999999999999}"],
    ids=["format-spec", "conversion", "int-spec-on-str", "huge-width"],
)
def test_batch_out_pattern_format_spec_traceback(base, tmp_path, out):
    yml = _batch(tmp_path, f"jobs:\n  - model: {base / 'single'}\n    groups: 2\n    out: '{out}'\n")
    r = cli("batch", yml, "--check")
    assert_clean_error(r, 2, "'out'")


def test_batch_uptrain_out_pattern_format_spec_traceback(base, tmp_path):
    yml = _batch(
        tmp_path, f"jobs:\n  - model: {base / 'single'}\n    groups: 2\n    uptrain: {{data: [x], out: '{{name:d}}'}}\n"
    )
    r = cli("batch", yml, "--check")
    assert_clean_error(r, 2)


def test_batch_out_pattern_width_blows_up_memory_and_time(base, tmp_path):
    """'{groups:>999999999}' builds a 1 GB path string (then resolves and prints it)."""
    import resource

    yml = _batch(tmp_path, f"jobs:\n  - model: {base / 'single'}\n    groups: 2\n    out: '{{groups:>999999999}}'\n")

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    rc, out, err = subprocess_cli(["batch", yml, "--check"], timeout=30, preexec_fn=limit)
    assert rc is not None, "no answer within 30 s"
    assert rc == 2 and "Traceback" not in err and err.strip().startswith("error:"), err[-800:]


@pytest.mark.parametrize("field", ["model", "out"])
def test_batch_nul_byte_in_a_path_field_traceback(base, tmp_path, field):
    model = f'"{base / "single"}\\0x"' if field == "model" else str(base / "single")
    extra = '\n    out: "o\\0x"' if field == "out" else ""
    yml = _batch(tmp_path, f"jobs:\n  - model: {model}\n    groups: 2{extra}\n")
    for args in (["--check"], []):
        r = cli("batch", yml, *args)
        assert_clean_error(r, 2)


def test_batch_empty_out_with_force_replaces_the_batch_folder(base, tmp_path):
    """out: "" is '.', the batch file's own folder; with force: true the job replaces it
    (the YAML and the user's files in it are deleted) and reports 'done'."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("precious")
    yml = proj / "jobs.yaml"
    yml.write_text(f'jobs:\n  - {{model: {base / "single"}, groups: 2, out: "", force: true}}\n')
    r = cli("batch", yml)
    assert (proj / "notes.txt").is_file() and yml.is_file(), f"the batch folder was replaced: {os.listdir(proj)}"
    assert_clean_error(r, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\njobs:\n  - {{model: {m}, groups: 2, name: *b}}\n",
            "anchors",
        ),
        ("jobs:\n  - {{model: {m}, groups: 2, 1: x}}\n", "field names must be text"),
        ("jobs:\n  - {{model: {m}, groups: 2, out: 'o-{{foo}}'}}\n", "placeholders"),
        ("jobs:\n  - {{model: {m}, groups: 2, out: '{{0}}'}}\n", "placeholders"),
        (
            "jobs:\n  - {{model: {m}, groups: 2, out: same, name: a}}\n  - {{model: {m}, groups: 2, out: ./x/../same, name: b}}\n",
            "both write",
        ),
        ("jobs:\n  - {{model: {m}, groups: [2, -1]}}\n", "at least 1"),
        ("jobs:\n  - {{model: {m}, groups: 2, verify: {{data: x, batch_size: 0}}}}\n", "batch_size"),
        ("jobs:\n  - {{model: {m}, groups: 2, uptrain: {{data: [x], lr: .nan}}}}\n", "lr"),
        ("jobs: " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
    ],
    ids=[
        "alias-bomb",
        "int-key",
        "unknown-placeholder",
        "positional",
        "same-resolved",
        "groups-neg",
        "verify-bs0",
        "lr-nan",
        "deep",
    ],
)
def test_ok_batch_file_refused_before_any_work(base, tmp_path, text, message):
    yml = _batch(tmp_path, text.format(m=base / "single"))
    for args in (["--check"], []):
        r = cli("batch", yml, *args)
        assert_clean_error(r, 2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]


def test_ok_batch_max_shard_size_honoured(base, tmp_path):
    yml = _batch(tmp_path, f"jobs:\n  - {{model: {base / 'single'}, groups: 2, out: o, max_shard_size: 20KB}}\n")
    assert_ok(cli("batch", yml))
    assert len(list((tmp_path / "o").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()


# =============================================================================================
# 9. uptrain: output preconditions, state directory, resume
# =============================================================================================


def test_ok_uptrain_output_preconditions_before_training(base, tmp_path, monkeypatch):
    import gqa_convert.training.uptrainer as up

    monkeypatch.setattr(up.Uptraining, "setup", lambda self: (_ for _ in ()).throw(AssertionError("setup ran")))
    conv = copy(base, "conv", tmp_path)
    (tmp_path / "taken").mkdir()
    for out, msg in ((conv / "sub", "inside"), (tmp_path / "taken", "already exists")):
        r = cli("uptrain", conv, "--data", base / "tiny.txt", "--out", out, *UP)
        assert_clean_error(r, 2, msg)
    ro = tmp_path / "ro"
    ro.mkdir()
    if can_make_read_only(ro):
        try:
            r = cli("uptrain", conv, "--data", base / "tiny.txt", "--out", ro / "u", *UP)
            assert_clean_error(r, 2, "cannot write in")
        finally:
            undo_read_only(ro)


def test_uptrain_dangling_symlink_out_fails_after_training(base, tmp_path, monkeypatch):
    import gqa_convert.training.uptrainer as up

    def trained(self, report):
        raise AssertionError("trained before --out was found unusable")

    monkeypatch.setattr(up.Uptraining, "train", trained)
    (tmp_path / "u").symlink_to(tmp_path / "nowhere")
    r = cli("uptrain", base / "conv", "--data", base / "tiny.txt", "--out", tmp_path / "u", *UP, timeout=60)
    assert_clean_error(r, 2)


def test_uptrain_state_path_that_is_a_file_traceback(base, tmp_path):
    (tmp_path / "u.uptrain-state").write_text("someone's file")
    r = cli("uptrain", base / "conv", "--data", base / "tiny.txt", "--out", tmp_path / "u", *UP, timeout=60)
    assert (tmp_path / "u.uptrain-state").read_text() == "someone's file"
    assert_ok_or_clean_error(r)


def test_uptrain_resume_with_damaged_progress_traceback(base, tmp_path, monkeypatch):
    import gqa_convert.training.uptrainer as up

    args = ["uptrain", base / "conv", "--data", base / "tiny.txt", "--out", tmp_path / "u"]
    args += ["--seq-len", "8", "--batch-size", "2", "--steps", "3", "--save-every", "1", "-q"]
    with monkeypatch.context() as m:  # interrupted just before the output is written: state kept
        m.setattr(up.Uptraining, "save", lambda self, report: (_ for _ in ()).throw(KeyboardInterrupt))
        r = cli(*args, timeout=60)
    assert r.exit_code == 130, describe(r)
    progress = tmp_path / "u.uptrain-state" / "step-2" / "progress.json"
    assert progress.is_file()
    d = json.loads(progress.read_text())
    d["history"] = "not a list"
    progress.write_text(json.dumps(d))
    r = cli(*args, "--resume", timeout=60)
    assert_clean_error(r, 2, "--resume")
    assert not (tmp_path / "u").exists()


def test_concurrent_uptrain_to_one_out_deletes_the_live_runs_state(base, tmp_path):
    """Run A trains into OUT with --save-every 1; run B starts with the same --out, removes
    OUT.uptrain-state as 'a previous run's state' (A is alive) and writes OUT; A then
    crashes with a traceback. No lock is held while training."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i + j) % 32}" for j in range(40)) for i in range(200)))
    out = tmp_path / "u"
    a = subprocess.Popen(
        [sys.executable, "-m", "gqa_convert", "uptrain", str(base / "conv"), "--data", str(text), "--out", str(out)]
        + ["--seq-len", "8", "--batch-size", "2", "--steps", "100000", "--save-every", "1", "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = tmp_path / "u.uptrain-state"
    try:
        deadline_t = time.time() + 90
        while not any(state.glob("step-*/progress.json")):
            assert a.poll() is None, a.stderr.read()
            assert time.time() < deadline_t, "run A saved no state"
            time.sleep(0.2)
        r = cli("uptrain", base / "conv", "--data", base / "tiny.txt", "--out", out, *UP, timeout=60)
        time.sleep(1.0)
        assert state.is_dir(), "run B removed the live run's resumable state"
        assert a.poll() is None, f"run A died: {a.stderr.read()[-600:]}"
        assert_clean_error(r, 2)
    finally:
        a.kill()
        a.wait()


# =============================================================================================
# 10. demo
# =============================================================================================


@pytest.mark.parametrize("which", ["--out", "--cache-dir"])
def test_demo_path_that_is_a_file_traceback(tmp_path, which):
    f = tmp_path / "afile"
    f.write_text("x")
    args = ["demo", "--quick", "--out", tmp_path / "o", "--cache-dir", tmp_path / "c"]
    args[args.index(which) + 1] = f
    r = cli(*args)
    assert_clean_error(r, 2)
    assert f.read_text() == "x"


def test_demo_overwrites_user_files_in_an_existing_out(base, tmp_path, monkeypatch):
    """demo --out DIR writes eval.txt, train.txt, results.json and replaces <method>-g<G>
    with force=True, whatever DIR already holds."""
    import gqa_convert.demo as demo

    out = tmp_path / "mine"
    (out / "mean-g4").mkdir(parents=True)
    (out / "mean-g4" / "keep.txt").write_text("keep")
    (out / "eval.txt").write_text("my evaluation set")
    monkeypatch.setattr(demo, "base_model", lambda s, cache, log: (base / "single", False))

    def stop(*a, **k):
        raise ConversionError("stopped by the test after the demo's first writes")

    monkeypatch.setattr(demo, "convert", stop)
    cli("demo", "--quick", "--out", out, "--cache-dir", tmp_path / "c")
    assert (out / "eval.txt").read_text() == "my evaluation set", "the user's eval.txt was overwritten"
    assert (out / "mean-g4" / "keep.txt").read_text() == "keep"


def test_demo_partial_cache_directory_crashes_after_training(tmp_path, monkeypatch):
    import gqa_convert.demo as demo
    from gqa_convert.training.loop import StepResult

    cache = tmp_path / "c"
    partial = cache / f"demo-mha-{demo.QUICK.key()}"
    partial.mkdir(parents=True)
    (partial / "leftover").write_text("from an interrupted run")
    monkeypatch.setattr(demo, "train", lambda model, batches, **kw: [StepResult(1, 1.0, 1.0, 0.1, 1)])

    def stop(*a, **k):
        raise ConversionError("stopped by the test after the base model")

    monkeypatch.setattr(demo, "convert", stop)
    r = cli("demo", "--quick", "--out", tmp_path / "o", "--cache-dir", cache, timeout=60)
    assert not crashed(r) and r.exit_code == 2, describe(r)  # the demo's progress lines come first
    assert r.output.strip().splitlines()[-1].startswith("error: stopped by the test")


# =============================================================================================
# 11. Correct behaviour worth keeping
# =============================================================================================


def test_ok_tied_head_with_different_stored_lm_head_keeps_logits(tmp_path):
    """tie_word_embeddings: true beside a different lm_head.weight: G = H output computes
    exactly what the source computes (transformers uses the stored head)."""
    from conftest import load, logits

    m = build_model("llama", tie_word_embeddings=False)
    sd = {k: v.contiguous().clone() for k, v in m.state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    src = tmp_path / "src"
    src.mkdir()
    m.config.save_pretrained(src)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    cfg_edit(src, tie_word_embeddings=True)
    assert_ok(cli(src, "-g", "4", "-o", tmp_path / "o", "-q"))
    assert torch.equal(logits(load(src)), logits(load(tmp_path / "o")))


def test_ok_integer_and_float8_kv_refused(base, tmp_path):
    for dtype, shape in (("I32", [32, 32]), ("U8", [32, 128]), ("F8_E4M3", [32, 128])):
        src = copy(base, "single", tmp_path, as_name=f"s{dtype}")

        def edit(h, d, dtype=dtype, shape=shape):
            h[K0]["dtype"], h[K0]["shape"] = dtype, shape
            return h

        _rewrite_header(src / "model.safetensors", edit)
        r = cli(src, "-g", "2", "-o", tmp_path / "o", "-q")
        assert_clean_error(r, 2, "cannot be pooled")
        assert not (tmp_path / "o").exists()


def test_ok_inspect_families_without_gqa_and_quantized(base, tmp_path):
    for model in (base / "gpt2",):
        r = cli("inspect", model, "--json")
        assert_ok(r)
        report = json.loads(r.stdout)
        assert report["family"] and "--emulate" in report["conversion"]
    src = copy(base, "single", tmp_path)
    cfg_edit(src, quantization_config={"quant_method": "gptq"})
    r = cli("inspect", src, "--json")
    assert_ok(r)
    assert "quantized" in json.loads(r.stdout)["conversion"]
