"""The output directory's guarantees, tested at the seams where they could break: the --force
swap under a signal and under a failing rename, literal names, live owners, created parents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gqa_convert.io.outdir as outdir
from gqa_convert import ConversionError
from gqa_convert.io.outdir import OutputDir


def _finished(tmp: Path, text: str) -> None:
    (tmp / "new.txt").write_text(text)


def test_signal_during_the_force_swap_lands_after_it(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_swap = OutputDir._swap

    def swap_then_signal(self):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the swap
        return real_swap(self)

    monkeypatch.setattr(OutputDir, "_swap", swap_then_signal)
    od = OutputDir(target, force=True)
    with pytest.raises(KeyboardInterrupt, match="already complete and is in place"):
        with od as tmp:
            _finished(tmp, "new")
            od.commit()
    assert (target / "new.txt").read_text() == "new" and not (target / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the old target and the lock are gone"


def test_a_failed_second_rename_puts_the_old_target_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new directory into place
            raise OSError(28, "No space left on device")
        return real_rename(a, b)

    monkeypatch.setattr(outdir.os, "rename", rename)
    od = OutputDir(target, force=True)
    with pytest.raises(OSError):
        with od as tmp:
            _finished(tmp, "new")
            od.commit()
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_names_are_literal_and_live_owners_are_spared(tmp_path):
    parent = tmp_path / "d"
    parent.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = parent / f".m1.gqa-tmp-{sleeper.pid}"  # a conversion into d/m1, still running
        live.mkdir()
        dead_pid = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        dead = parent / f".m*.gqa-tmp-{int(dead_pid.stdout)}"  # a killed run into the literal name d/m*
        dead.mkdir()
        live_same = parent / f".m*.gqa-tmp-{sleeper.pid}"
        live_same.mkdir()
        for name in ("m*", "m[1]", "a**"):
            od = OutputDir(parent / name)
            with od as tmp:
                _finished(tmp, name)
                od.commit()
            assert (parent / name / "new.txt").read_text() == name
        assert live.is_dir(), "another target's temporary directory is never touched"
        assert live_same.is_dir(), "a temporary directory whose owner is alive is never removed"
        assert not dead.exists(), "a dead run's leftovers for this very name are removed"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failed_run_removes_the_parents_it_created(tmp_path):
    od = OutputDir(tmp_path / "new1" / "new2" / "out")
    with pytest.raises(RuntimeError):
        with od as tmp:
            _finished(tmp, "x")
            raise RuntimeError("the conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_link_targets_are_refused_before_any_work(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name in ("dangling", "link"):
        with pytest.raises(ConversionError, match="is a symbolic link"):
            OutputDir(tmp_path / name, force=True).check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "real"]


def test_interrupt_message_is_truthful_from_the_cli(tmp_path):
    """Ctrl-C while converting with --force: the old target stays, and the message says so."""
    from conftest import make_checkpoint

    src, _ = make_checkpoint(tmp_path, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    code = (
        "import sys, time, gqa_convert.io.writer as w; real = w.ShardWriter.write; "
        "w.ShardWriter.write = lambda self, *a: (time.sleep(0.2), real(self, *a))[1]; "
        "from gqa_convert.cli import main; sys.argv = ['gqa-convert'] + sys.argv[1:]; main()"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(src), "-g", "2", "-o", str(tmp_path / "out"), "--force"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not any(tmp_path.glob(".out.gqa-tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "left as it was" in " ".join(err.split())
    assert (tmp_path / "out" / "old.txt").read_text() == "old"


def test_a_target_set_aside_by_a_killed_force_run_is_put_back(tmp_path):
    """SIGKILL between the two renames of the fallback swap: the old target sits under its
    set-aside name; the next run puts it back instead of removing it as stale."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.gqa-tmp-old-{int(dead.stdout)}"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    od = OutputDir(tmp_path / "out")
    with pytest.raises(ConversionError, match="already exists"):
        with od:
            pass  # the restored target now exists: without --force the run refuses to replace it
    assert (tmp_path / "out" / "old.txt").read_text() == "old" and not aside.exists()
