"""One writer per workdir, and a disk that fills up during a save.

The lock tests hold or leave a lock from another process (a live owner is refused by
name; a killed one's lock is taken over). The full-disk test fills a real tmpfs where
the test may mount one (root with CAP_SYS_ADMIN), and otherwise injects ENOSPC into
Orbax's writer; either way the run stops with one line, the previous checkpoint stays,
and the rerun logs bitwise the losses of an uninterrupted run.
"""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from ftjax import checkpoint as ckpt_lib
from ftjax import train, workdir_lock
from ftjax.errors import UserError, one_line
from tests.conftest import data_files, logged_losses, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLD = ("import sys; from ftjax.workdir_lock import WorkdirLock; lock = WorkdirLock(sys.argv[1]); lock.acquire(); "
        "print('locked', flush=True); sys.stdin.read(); lock.release()")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_files(tmp_path_factory.mktemp("data"))


def _config(files, **overrides):
    return tiny_config(files, **{"total_steps": 6, "checkpoint_every_steps": 2, "eval_every_steps": 3,
                                 "export": False, **overrides})


def _holder(workdir):
    """A process that holds the workdir's lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _steps(folder) -> list[str]:
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


def test_second_writer_is_refused_with_the_owner_named(files, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    owner = _holder(workdir)
    try:
        with pytest.raises(workdir_lock.WorkdirBusy) as e:
            train.train_and_evaluate(_config(files), str(workdir))
        message = one_line(e.value)
        assert f"pid {owner.pid}" in message and f"host {socket.gethostname()}" in message, message
        assert "in use by another ftjax run" in message
        assert _steps(workdir) == [workdir_lock.LOCK_NAME]  # nothing written beside the owner's lock
        record = json.loads((workdir / workdir_lock.LOCK_NAME).read_text())
        assert record["pid"] == owner.pid  # the owner's record is untouched
        # the CLI: one line, exit status 2, no traceback
        r = subprocess.run([sys.executable, "-m", "ftjax.main", "--config=configs/bert_sst2.py:demo",
                            f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("ftjax: error: workdir"), r.stderr
        assert f"pid {owner.pid}" in lines[0]
    finally:
        owner.stdin.close()
        owner.wait(timeout=30)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()  # the owner released it on exit


def test_stale_lock_of_a_killed_run_is_taken_over_and_released(files, tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    owner = _holder(workdir)
    owner.send_signal(signal.SIGKILL)  # no release: the record stays, the kernel drops the flock
    owner.wait(timeout=30)
    assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())["pid"] == owner.pid
    train.train_and_evaluate(_config(files, total_steps=2), str(workdir))
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {owner.pid}" in err, err[-2000:]
    assert not (workdir / workdir_lock.LOCK_NAME).exists()
    assert json.loads((workdir / "summary.json").read_text())["final_step"] == 2


def test_lock_is_released_when_the_run_fails(files, tmp_path):
    workdir = tmp_path / "w"
    with pytest.raises(UserError):
        train.train_and_evaluate(_config(files, **{"data.files.train": str(tmp_path / "none.csv")}), str(workdir))
    assert not (workdir / workdir_lock.LOCK_NAME).exists()
    with workdir_lock.WorkdirLock(workdir):  # free again
        pass


# ---- a full disk --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(_config(files), str(workdir))
    return workdir


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()[:200]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_before_saving(monkeypatch, disk: pathlib.Path, step: int) -> pathlib.Path:
    """Fills `disk` (leaving room for log lines, not for a checkpoint) as the save of `step` begins."""
    ballast = disk / "ballast"
    save = ckpt_lib.Checkpointer.save

    def fill_then_save(self, s, state, **kw):
        if s == step:
            self.wait()  # the earlier saves (best/3 in the background) land first: the full disk hits `step`
            # Unbuffered: a buffered file keeps the bytes of the write that failed and
            # raises ENOSPC again from truncate() or close(), before the save begins.
            with open(ballast, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                f.truncate(max(f.tell() - (128 << 10), 0))
        return save(self, s, state, **kw)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", fill_then_save)
    return ballast


def _inject_enospc(monkeypatch, step: int) -> None:
    """Orbax's JSON item writer fails with ENOSPC for the checkpoint of `step` (after the
    arrays of that step were written into its tmp folder)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    original = jch.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if f"checkpoints/{step}." in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_full_disk_keeps_the_previous_checkpoint_and_the_rerun_continues_bitwise(
        how, files, reference, tmp_path, monkeypatch, request, capsys):
    if how == "tmpfs":
        disk = request.getfixturevalue("tmpfs")
        workdir = disk / "w"
        ballast = _fill_before_saving(monkeypatch, disk, 4)
    else:
        workdir = tmp_path / "w"
        _inject_enospc(monkeypatch, 4)
    config = _config(files)
    with pytest.raises(ckpt_lib.DiskFullError) as e:
        train.train_and_evaluate(config, str(workdir))
    message = one_line(e.value)
    assert f"could not write checkpoint {workdir}/checkpoints/4: no space left on device" in message, message
    assert "the previous checkpoint, step 2, is kept" in message and len(message) < 400
    assert [s for s in _steps(workdir / "checkpoints") if s.isdigit()] == ["2"]  # no step 4 that looks whole
    assert not (workdir / workdir_lock.LOCK_NAME).exists()

    monkeypatch.undo()  # space is back
    if how == "tmpfs":
        ballast.unlink()
    capsys.readouterr()
    summary = train.train_and_evaluate(config, str(workdir))
    assert f"resumed from {workdir} at step 2" in capsys.readouterr().err  # the kept checkpoint restores
    assert summary["final_step"] == 6
    want, got = logged_losses(reference), logged_losses(workdir)
    assert sorted(got) == list(range(1, 7)) and got == want  # exact float equality
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))  # the failed run's 3, 4: dropped
