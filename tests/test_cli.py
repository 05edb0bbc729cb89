"""The command line, through typer's CliRunner and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import load, make_checkpoint
from typer.testing import CliRunner

from gqa_convert.cli import app, normalize_argv

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, normalize_argv(list(args)))


@pytest.fixture
def src(tmp_path):
    return make_checkpoint(tmp_path, "llama")[0]


def test_bare_form_and_convert_subcommand_are_the_same(tmp_path, src):
    a = run(str(src), "--groups", "2", "--out", str(tmp_path / "a"), "--quiet")
    b = run("convert", str(src), "--groups", "2", "--out", str(tmp_path / "b"), "--quiet")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_mqa_flag_and_default_output(tmp_path, src):
    r = run(str(src), "--mqa", "--quiet")
    assert r.exit_code == 0, r.output
    assert load(tmp_path / "src-mqa").config.num_key_value_heads == 1


def test_json_report_on_stdout(tmp_path, src):
    r = run(str(src), "-g", "2", "-o", str(tmp_path / "o"), "--json", "--quiet")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["kv_heads_before"] == 4 and data["kv_heads_after"] == 2
    assert data["kv_cache"]["saving"] == 0.5 and not data["dry_run"]


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, src):
    r = run(str(src), "--groups", "1", "--out", str(tmp_path / "o"), "--dry-run")
    assert r.exit_code == 0
    assert "k_proj.weight" in r.output and "[32, 32]" in r.output and "[8, 32]" in r.output
    assert "nothing written" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "-g", "2"], "no such directory"),
        (["{tmp}/empty", "-g", "2"], "no config.json"),
        (["{tmp}/gpt2", "-g", "2"], "unsupported architecture"),
        (["{src}", "-g", "3"], "does not divide the 4 query heads"),
        (["{src}", "-g", "0"], "at least 1"),
        (["{src}", "-g", "8"], "more KV heads than the checkpoint has"),
        (["{src}", "-g", "2", "--out", "{src}"], "inside it"),
        (["{src}", "-g", "2", "--out", "{src}/sub"], "inside it"),
        (["{src}", "-g", "2", "--out", "{tmp}/exists"], "already exists"),
        (["{src}", "-g", "2", "--method", "median"], "unknown method"),
        (["{src}"], "--groups"),
        (["{src}", "-g", "2", "--max-shard-size", "lots"], "not a size"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, src, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "mamba", "n_head": 4}))
    argv = [a.format(tmp=tmp_path, src=src) for a in args]
    r = run(*argv)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert "Traceback" not in r.output
    if "unsupported" in message:
        assert "llama" in r.output and "qwen2" in r.output  # names the supported families


def test_force_replaces_existing_output(tmp_path, src):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("old")
    r = run(str(src), "-g", "2", "-o", str(tmp_path / "o"), "--force", "-q")
    assert r.exit_code == 0
    assert not (tmp_path / "o" / "old.txt").exists() and (tmp_path / "o" / "config.json").exists()


def test_help_teaches():
    r = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "120"})
    assert r.exit_code == 0
    for word in ("--groups", "--mqa", "--method", "--dry-run", "--json", "Examples", "Exit codes"):
        assert word in r.output


def test_real_subprocess_bare_form(tmp_path, src):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "gqa_convert", str(src), "--groups", "2", "--out", str(tmp_path / "o"), "--json", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["output"] == str(tmp_path / "o")
    p = subprocess.run(
        [sys.executable, "-m", "gqa_convert", str(tmp_path / "nope"), "-g", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr


def test_hub_id_resolved_from_the_local_cache_offline(tmp_path):
    """A hub id is resolved through huggingface_hub (offline, from its cache); the manifest
    records the hub id and the snapshot's revision."""
    src = make_checkpoint(tmp_path, "llama")[0]
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    p = subprocess.run(
        [sys.executable, "-m", "gqa_convert", "someone/tiny-llama", "--mqa", "--json", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["output"] == str(tmp_path / "tiny-llama-mqa")
    manifest = json.loads((tmp_path / "tiny-llama-mqa" / "gqa_convert.json").read_text())
    assert manifest["source"]["hub_id"] == "someone/tiny-llama" and manifest["source"]["revision"] == sha
    p = subprocess.run(
        [sys.executable, "-m", "gqa_convert", "someone/not-cached", "--mqa"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 2 and "not in the local cache" in p.stderr


def test_error_messages_keep_brackets(tmp_path):
    # rich markup must not eat parts of a message (e.g. "gqa-convert[data]" or a path with brackets)
    r = runner.invoke(app, normalize_argv([str(tmp_path / "model[v2]"), "-g", "2"]))
    assert r.exit_code == 2 and "model[v2]" in r.output


def test_the_package_imports_the_pipeline_only_when_used():
    """`import gqa_convert` is light (the API loads on first use), which lets the executable
    import the CLI with the garbage collector paused (gqa_convert/launch.py)."""
    code = (
        "import sys, gqa_convert; assert 'torch' not in sys.modules, 'imported torch'; "
        "from gqa_convert import convert, verify, ConversionError; assert 'torch' in sys.modules; "
        "assert set(gqa_convert.__all__) <= set(dir(gqa_convert)); "
        "[getattr(gqa_convert, n) for n in gqa_convert.__all__]; print('ok')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_ctrl_c_while_the_cli_is_imported_is_one_line_and_exit_130():
    """Ctrl-C in the first second or so (torch being imported, before any command's own
    handling) ends with the usual one-line message and exit code, not a traceback. The import
    is made to be interrupted here (a stub CLI module), so the moment is exact."""
    code = (
        "import sys, types\n"
        "class Stub(types.ModuleType):\n"
        "    def __getattr__(self, name):\n"
        "        raise KeyboardInterrupt\n"
        "sys.modules['gqa_convert.cli'] = Stub('gqa_convert.cli')\n"
        "sys.argv = ['gqa-convert', '--version']\n"
        "from gqa_convert.launch import main\n"
        "main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr == "error: interrupted\n", p.stderr


def test_start_up_read_ahead_is_a_harmless_hint(tmp_path, src, monkeypatch):
    """The executable hints the kernel to read the model's first weight files while Python
    imports torch: only regular files of a directory among the first two arguments, within
    the budget, never a FIFO (opening one for reading would block the start)."""
    from gqa_convert import launch

    hinted = []
    real = os.posix_fadvise
    monkeypatch.setattr(launch.os, "posix_fadvise", lambda fd, off, n, adv: (hinted.append(n), real(fd, off, n, adv)))
    os.mkfifo(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "c.safetensors").write_bytes(b"y" * 1000)
    (tmp_path / "notes.txt").write_text("not weights")
    launch.prefetch(["convert", str(tmp_path), "-g", "2"], budget=1500)
    assert hinted == [1000, 500]
    hinted.clear()
    launch.prefetch(["verify", "--data", str(tmp_path)])  # only the first two arguments are looked at
    launch.prefetch([str(tmp_path / "nope"), "\0"])
    assert hinted == []
    launch.prefetch([str(src)])
    assert hinted and sum(hinted) == sum(p.stat().st_size for p in src.glob("*.safetensors"))
