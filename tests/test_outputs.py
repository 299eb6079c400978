"""Faults of :mod:`mlx_dsvl.outputs`, the one crash-safe output mechanism of the converter and of
training: a writer killed (``kill -9``) or frozen at each point of a staged folder's life and of
an atomic file write; what the next writer reclaims, what it must leave alone, and the
permissions of what is written.  The tools' own fault tests (tests/test_faults.py,
tests/test_faults_training.py) run the same mechanism end to end."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_dsvl import faults
from mlx_dsvl.outputs import Staged, reclaim_stale, remove_abandoned, replace_atomic, temporary, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

# A writer into OUT: a staged replacement of OUT (one file, a temporary beside it), then a
# temporary file inside OUT; it freezes (SIGSTOP) before finishing, unless a fault kills it first.
WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mlx_dsvl.outputs import Staged, temporary
    out = Path(sys.argv[1])
    staged = Staged(out)
    staged.partial.mkdir()
    (staged.partial / "model.bin").write_bytes(b"new" * 1000)
    with temporary(out / "notes.txt"):
        if sys.argv[2] == "publish":
            staged.publish()
        os.kill(os.getpid(), signal.SIGSTOP)
""")


def start_writer(out: Path, step: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), step], env=env)


def wait_stopped(proc: subprocess.Popen) -> None:
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the writer ended instead (status {status})"


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=60)


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An existing output folder: what a --force writer replaces."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    return out


def test_a_live_writers_files_are_never_touched_a_dead_ones_are_reclaimed(earlier, tmp_path):
    proc = start_writer(earlier, "write")
    try:
        wait_stopped(proc)  # frozen mid-write: alive, as a slow writer or another container's is
        before = listing(tmp_path), listing(earlier)
        told = []
        assert reclaim_stale(earlier, told.append) == 0
        remove_abandoned(earlier)
        assert (listing(tmp_path), listing(earlier)) == before and told == []
        assert any(n.startswith(".notes.txt.tmp.") for n in before[1]), before
    finally:
        kill(proc)
    told = []
    assert reclaim_stale(earlier, told.append) == 3000
    remove_abandoned(earlier)
    assert listing(tmp_path) == ["out"] and listing(earlier) == ["mine.txt"]
    assert told == ["removed 1 partial folder(s) of interrupted writes into out: 3.00 KB freed"]


@pytest.mark.parametrize("point,kept", [(1, "mine.txt"), (2, "model.bin")])
def test_killed_during_the_swap_leaves_the_old_folder_or_the_complete_new_one(earlier, tmp_path, point, kept):
    """Killed before moving the old folder aside (1) it stays; killed between the two renames (2)
    the complete new folder is put in place by the next writer."""
    proc = start_writer(earlier, "publish", fault=f"replace:{point}:KILL")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    told = []
    reclaim_stale(earlier, told.append)
    remove_abandoned(earlier)
    assert listing(tmp_path) == ["out"] and listing(earlier) == [kept]
    assert told[0].startswith("completed the interrupted replacement" if point == 2 else "removed 1 partial")


def test_an_interrupted_force_replace_gets_the_old_folder_back(tmp_path):
    """Killed between moving the old --out aside and renaming the new one in: put it back."""
    out = tmp_path / "out"
    old = tmp_path / ".out.old-abc123"
    old.mkdir()
    (old / "mine.txt").write_text("keep me")
    (tmp_path / ".out.partial-abc123").mkdir()
    (tmp_path / ".out.partial-abc123" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".out.partial-abc123.lock").touch()
    told = []
    reclaim_stale(out, told.append)
    assert listing(tmp_path) == ["out"] and (out / "mine.txt").read_text() == "keep me"
    assert told[0].startswith("restored") and "1.00 KB freed" in told[1]


def test_held_locks_and_lockless_folders_are_left_alone(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.partial-live").mkdir()
    lock = tmp_path / ".out.partial-live.lock"
    lock.touch()
    (tmp_path / ".out.partial-legacy").mkdir()  # an older version's leftovers: no lock file
    (tmp_path / ".out.new-4242").mkdir()
    told = []
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a running writer holds it
        assert reclaim_stale(out, told.append) == 0
    assert listing(tmp_path) == [".out.new-4242", ".out.partial-legacy", ".out.partial-live",
                                 ".out.partial-live.lock"]
    assert len(told) == 2 and all("no lock file" in t for t in told), told
    assert "new-4242" in told[0] and "partial-legacy" in told[1]


def test_a_leftover_is_reclaimed_even_when_its_writers_pid_lives_again(tmp_path):
    """Liveness is the writer's lock, not its pid: a pid is reused, and another container's pid
    means nothing here.  (An older version named temporaries after the pid: here a live one.)"""
    left = tmp_path / f".step-0000004.tmp{os.getpid()}.x1y2"
    left.mkdir()
    (left / "state.json").write_text("{}")
    (tmp_path / f".latest.tmp{os.getpid()}.z3").write_text("step-0000004")
    (tmp_path / ".notes.tmp").write_text("a user's file, not a temporary")
    remove_abandoned(tmp_path)
    assert listing(tmp_path) == [".notes.tmp"]


def test_files_get_the_permissions_of_the_umask_at_write_time(tmp_path):
    """No import-time umask: a file written atomically gets what ``open()`` would give it now."""
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "run_config.json", "{}")
        with temporary(tmp_path / "folder", folder=True) as tmp:
            folder_mode = tmp.stat().st_mode & 0o777
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(previous)
    assert (tmp_path / "run_config.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
    assert folder_mode == 0o700
    assert [n for n in listing(tmp_path) if n.startswith(".run_config")] == []  # no temporary left


def test_a_failed_write_leaves_nothing_and_the_old_file(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step-0000002\n")

    def fails(tmp: Path) -> None:
        tmp.write_text("step-00000")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomic(target, fails)
    assert listing(tmp_path) == ["latest"] and target.read_text() == "step-0000002\n"


def test_abandon_puts_an_earlier_folder_back_and_removes_the_rest(earlier, tmp_path):
    staged = Staged(earlier)
    staged.partial.mkdir()
    os.rename(earlier, staged.old)  # as publish does, then a failure before the new one moved in
    staged.abandon()
    assert listing(tmp_path) == ["out"] and listing(earlier) == ["mine.txt"]
