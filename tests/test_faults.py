"""The fault matrix: every bad input and every fault while writing, one case per row.
Each asserts the exit code, the message, that the source is unchanged, and that the target
is absent (or complete and loadable)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_model, load, make_checkpoint, save_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gqa_convert.cli import app, normalize_argv

runner = CliRunner()


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("model*.safetensors"))


# --- bad inputs: each a (setup, args, message) row; exit 2, nothing written -----------------


def _no_config(src):
    (src / "config.json").unlink()


def _bad_json(src):
    (src / "config.json").write_text("{not json")


def _no_heads(src):
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_attention_heads"]
    (src / "config.json").write_text(json.dumps(cfg))


def _unknown_type(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (src / "config.json").write_text(json.dumps(cfg))


def _missing_shard(src):
    shards(src)[1].unlink()


def _index_lists_absent_tensor(src):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.self_attn.k_proj.weight"] = shards(src)[0].name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _tensor_in_two_shards(src):
    a, b = shards(src)[:2]
    ta, tb = load_file(a), load_file(b)
    name = sorted(ta)[0]
    tb[name] = ta[name]
    save_file(tb, b, metadata={"format": "pt"})


def _no_index_several_shards(src):
    (src / "model.safetensors.index.json").unlink()


def _truncated(src):
    s = shards(src)[0]
    s.write_bytes(s.read_bytes()[:-100])


def _garbage_header(src):
    s = shards(src)[0]
    raw = s.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    s.write_bytes(raw[:8] + b"\x00garbage" + raw[16 : 8 + n] + raw[8 + n :])


def _huge_header_length(src):
    s = shards(src)[0]
    raw = s.read_bytes()
    s.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])


def _shape_vs_config(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_attention_heads"] = 2  # weights have 4 heads of 8
    cfg["num_key_value_heads"] = 2
    cfg["head_dim"] = 8
    (src / "config.json").write_text(json.dumps(cfg))


def _plant(value):
    def plant(src):
        for s in shards(src):
            t = load_file(s)
            name = "model.layers.1.self_attn.v_proj.weight"
            if name in t:
                t[name][0, 0] = value
                save_file(t, s, metadata={"format": "pt"})

    return plant


BAD_INPUTS = [
    ("missing path", None, ["{tmp}/absent", "-g", "2"], "no such directory"),
    ("no config.json", _no_config, ["{src}", "-g", "2"], "no config.json"),
    ("config not JSON", _bad_json, ["{src}", "-g", "2"], "not valid JSON"),
    ("config without head counts", _no_heads, ["{src}", "-g", "2"], "no valid 'num_attention_heads'"),
    ("unknown model_type", _unknown_type, ["{src}", "-g", "2"], "unsupported architecture: model_type 'mamba'"),
    ("index names a missing shard", _missing_shard, ["{src}", "-g", "2"], "which is not there"),
    ("index lists a tensor its shard lacks", _index_lists_absent_tensor, ["{src}", "-g", "2"], "does not hold it"),
    ("tensor in two shards", _tensor_in_two_shards, ["{src}", "-g", "2"], "appears in two shards"),
    (
        "several shards, no index",
        _no_index_several_shards,
        ["{src}", "-g", "2"],
        "safetensors files and no model.safetensors.index.json",
    ),
    ("truncated safetensors", _truncated, ["{src}", "-g", "2"], "truncated file"),
    ("garbage header", _garbage_header, ["{src}", "-g", "2"], "corrupt safetensors header"),
    ("header length beyond the file", _huge_header_length, ["{src}", "-g", "2"], "corrupt safetensors header"),
    ("shape disagrees with config", _shape_vs_config, ["{src}", "-g", "1"], "disagrees with config.json"),
    (
        "NaN in V weights",
        _plant(float("nan")),
        ["{src}", "-g", "2"],
        "model.layers.1.self_attn.v_proj.weight: contains NaN or Inf",
    ),
    (
        "NaN in V weights, fold (converted on a worker thread)",
        _plant(float("nan")),
        ["{src}", "-g", "2", "--method", "fold"],
        "model.layers.1.self_attn.v_proj.weight: contains NaN or Inf",
    ),
    (
        "Inf in V weights",
        _plant(float("inf")),
        ["{src}", "-g", "2"],
        "model.layers.1.self_attn.v_proj.weight: contains NaN or Inf",
    ),
    ("groups zero", None, ["{src}", "-g", "0"], "at least 1"),
    ("groups negative", None, ["{src}", "-g", "-2"], "at least 1"),
    ("groups not dividing H", None, ["{src}", "-g", "3"], "does not divide the 4 query heads"),
    ("groups above KV heads", None, ["{src}", "-g", "8"], "more KV heads than the checkpoint has"),
    ("unknown method", None, ["{src}", "-g", "2", "--method", "svd"], "unknown method 'svd'"),
    ("target exists", None, ["{src}", "-g", "2", "--out", "{tmp}/taken"], "already exists; pass --force"),
    ("target is the source", None, ["{src}", "-g", "2", "--out", "{src}"], "inside it"),
    ("target inside the source", None, ["{src}", "-g", "2", "--out", "{src}/out"], "inside it"),
    ("target contains the source", None, ["{src}", "-g", "2", "--out", "{tmp}", "--force"], "contains the source"),
]


@pytest.mark.parametrize("case, setup, args, message", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input(tmp_path, case, setup, args, message):
    src, _ = make_checkpoint(tmp_path, "llama", max_shard_size="20KB")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("keep")
    if setup:
        setup(src)
    before = tree_hash(src)
    listing = sorted(p.name for p in tmp_path.iterdir())
    r = runner.invoke(app, normalize_argv([a.format(src=src, tmp=tmp_path) for a in args] + ["-q"]))
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert message in text and text.startswith("error:") and "Traceback" not in r.output
    assert tree_hash(src) == before, "the source is never modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "nothing written, no temp or lock files"
    assert (tmp_path / "taken" / "keep.txt").read_text() == "keep"


def test_malicious_pickle_never_runs(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama", fmt="bin")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    before = tree_hash(src)
    r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "-q"]))
    assert r.exit_code == 2 and "refused to load" in r.output and "could run code" in " ".join(r.output.split())
    assert not marker.exists()
    assert tree_hash(src) == before and not (tmp_path / "src-gqa2").exists()


def test_remote_code_never_imported_by_convert_and_refused_by_verify(tmp_path):
    src, model = make_checkpoint(tmp_path, "llama")
    marker = tmp_path / "imported"
    (src / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "--out", str(tmp_path / "o"), "-q"]))
    assert r.exit_code == 0 and not marker.exists()
    assert (tmp_path / "o" / "modeling_evil.py").is_file(), "custom code is copied, never run"
    r = runner.invoke(app, ["verify", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2 and "--trust-remote-code" in r.output and not marker.exists()
    r = runner.invoke(
        app,
        [
            "uptrain",
            str(tmp_path / "o"),
            "--data",
            str(src / "config.json"),
            "--out",
            str(tmp_path / "u"),
            "--steps",
            "1",
            "-q",
        ],
    )
    assert r.exit_code == 2 and "--trust-remote-code" in r.output and not marker.exists()


def test_force_keeps_old_target_when_new_one_fails(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama")
    _plant(float("nan"))(src)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("old")
    r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "--out", str(tmp_path / "o"), "--force", "-q"]))
    assert r.exit_code == 2 and "NaN" in r.output
    assert (tmp_path / "o" / "old.txt").read_text() == "old"


def test_read_only_parent(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama")
    parent = tmp_path / "locked"
    parent.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode == 0
    if not immutable:
        os.chmod(parent, 0o555)
        if os.access(parent, os.W_OK):
            pytest.skip("cannot make a directory read-only here (root without chattr)")
    try:
        before = tree_hash(src)
        r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "--out", str(parent / "o"), "-q"]))
        assert r.exit_code == 2 and "cannot write in" in r.output
        assert tree_hash(src) == before and list(parent.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(parent)], capture_output=True)
        os.chmod(parent, 0o755)


def _big_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint with many tensors (and a space in its name)."""
    model = build_model("llama", num_hidden_layers=6)
    return save_model(model, tmp_path / "big src", max_shard_size="20KB")


# A conversion slowed down to ~100 ms per tensor, so a test can reliably act while it runs.
SLOW = (
    "import sys, time; import gqa_convert.io.writer as w; real = w.ShardWriter.write; "
    "w.ShardWriter.write = lambda self, *a: (time.sleep(0.1), real(self, *a))[1]; "
    "from gqa_convert.cli import main; sys.argv = ['gqa-convert'] + sys.argv[1:]; main()"
)


# A conversion that writes its first tensor, then waits until the file $GQA_TEST_RELEASE exists
# (so a test can start a second command, however slowly it starts, while the first is mid-write).
HELD = (
    "import os, sys, time; import gqa_convert.io.writer as w; real = w.ShardWriter.write; "
    "held = lambda: [time.sleep(0.05) for _ in range(2400) if not os.path.exists(os.environ['GQA_TEST_RELEASE'])]; "
    "w.ShardWriter.write = lambda self, *a: (self._fd is not None and held(), real(self, *a))[1]; "
    "from gqa_convert.cli import main; sys.argv = ['gqa-convert'] + sys.argv[1:]; main()"
)


def _run(args: list[str], slow: bool = True, release: Path | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if release is not None:
        env["GQA_TEST_RELEASE"] = str(release)
        cmd = [sys.executable, "-c", HELD, *args]
    else:
        cmd = [sys.executable, "-c", SLOW, *args] if slow else [sys.executable, "-m", "gqa_convert", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for_tmp(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 60) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [p for p in parent.glob(f".{name}.gqa-tmp-*") if any(p.glob("*.safetensors"))]
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"conversion ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("no temporary output appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_conversion(tmp_path, sig):
    src = _big_checkpoint(tmp_path)
    before = tree_hash(src)
    target = tmp_path / "out"
    proc = _run([str(src), "-g", "2", "--out", str(target)])
    _wait_for_tmp(tmp_path, "out", proc)
    proc.send_signal(sig)
    start = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - start < 10, "exits promptly"
    assert proc.returncode == 130 and "interrupted" in err
    assert not target.exists() and not list(tmp_path.glob(".out*")), "temporary output and lock removed"
    assert tree_hash(src) == before


def test_sigkill_then_next_run_cleans_up(tmp_path):
    src = _big_checkpoint(tmp_path)
    target = tmp_path / "out"
    proc = _run([str(src), "-g", "2", "--out", str(target)])
    stale = _wait_for_tmp(tmp_path, "out", proc)
    proc.kill()
    proc.wait()
    assert not target.exists() and stale.exists()
    again = _run([str(src), "-g", "2", "--out", str(target), "--json", "-q"], slow=False)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert json.loads(out)["removed_stale"] == [str(stale)]
    assert not stale.exists() and load(target).config.num_key_value_heads == 2


def test_two_conversions_to_one_target(tmp_path):
    src = _big_checkpoint(tmp_path)
    target = tmp_path / "out"
    release = tmp_path / "release"
    first = _run([str(src), "-g", "2", "--out", str(target)], release=release)
    _wait_for_tmp(tmp_path, "out", first)
    second = _run([str(src), "-g", "2", "--out", str(target)], slow=False)
    _, err2 = second.communicate(timeout=120)
    release.touch()
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "another gqa-convert is writing" in err2
    assert load(target).config.num_key_value_heads == 2


def test_lock_held_by_a_running_conversion(tmp_path):
    import fcntl

    src, _ = make_checkpoint(tmp_path, "llama")
    lock = tmp_path / ".out.gqa-convert.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a conversion in progress holds it
        r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "--out", str(tmp_path / "out"), "-q"]))
    assert r.exit_code == 2 and "another gqa-convert is writing" in r.output
    assert not (tmp_path / "out").exists()


def test_file_size_limit_mid_write(tmp_path):
    src, _ = make_checkpoint(tmp_path, "llama")
    before = tree_hash(src)
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from gqa_convert.cli import main; sys.argv = ['gqa-convert'] + sys.argv[1:]; main()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(src), "-g", "2", "--out", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1, p.stderr
    assert "file-size limit was hit" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    assert tree_hash(src) == before


def test_spaces_non_ascii_and_symlinked_source(tmp_path):
    src, model = make_checkpoint(tmp_path, "llama", name="modèle à tester")
    link = tmp_path / "lien"
    link.symlink_to(src)
    r = runner.invoke(app, normalize_argv([str(link), "-g", "2", "--out", str(tmp_path / "sortie été"), "-q"]))
    assert r.exit_code == 0, r.output
    assert load(tmp_path / "sortie été").config.num_key_value_heads == 2
    r = runner.invoke(app, normalize_argv([str(link), "-g", "1", "-q"]))
    assert r.exit_code == 0 and (tmp_path / "modèle à tester-mqa").is_dir()


def test_written_shards_are_checked_before_rename(tmp_path, monkeypatch):
    """A write that silently loses bytes is caught by the re-check; nothing reaches the target."""
    import gqa_convert.io.writer as writer

    src, _ = make_checkpoint(tmp_path, "llama")
    real = writer.ShardWriter.close

    def close_then_corrupt(self):
        digests = real(self)
        path = self.out_dir / self.names[0]
        path.write_bytes(path.read_bytes()[:-8])
        return digests

    monkeypatch.setattr(writer.ShardWriter, "close", close_then_corrupt)
    r = runner.invoke(app, normalize_argv([str(src), "-g", "2", "--out", str(tmp_path / "o"), "-q"]))
    assert r.exit_code == 2 and "truncated" in r.output
    assert not (tmp_path / "o").exists()
