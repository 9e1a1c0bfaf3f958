"""Runs that die and come back: SIGKILL, SIGTERM, NaN, other device counts, 2 processes.

Every run here is the CLI in a subprocess with the same XLA flags, so an interrupted
run and an uninterrupted one can be compared bitwise, loss by loss.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import data_files, logged_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return data_files(tmp_path_factory.mktemp("data"), train=64, test=0)


def _args(files, workdir, **overrides):
    config = {"model.pretrained": "", "model.variant": "tiny", "model.tokenizer": str(files["vocab"]),
              "data.name": "local_text", "data.data_dir": str(files["data_dir"]),
              "data.files.train": str(files["train"]), "data.files.dev": str(files["dev"]),
              "data.max_length": 16, "data.group_by_length": 0, "batch_size": 16, "eval_batch_size": 16,
              "total_steps": TOTAL, "checkpoint_every_steps": 4, "eval_every_steps": 6,
              "log_every_steps": 1, "progress_bar": False, "optimizer.lr": 1e-3, "export": False}
    config.update(overrides)
    return ([sys.executable, "-m", "ftjax.main", f"--config={ROOT}/configs/bert_sst2.py:demo",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in config.items()])


def _env(devices=8):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")


def _run(args, devices=8, check=True):
    r = subprocess.run(args, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=400)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _params(workdir):
    from ftjax import checkpoint as ckpt_lib

    return ckpt_lib.load_export(workdir)[0]


def _start_and_wait_for_checkpoint(args, workdir):
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    ckpts = pathlib.Path(workdir) / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    return proc


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(_args(files, workdir, export=True))
    return workdir


def test_sigkill_then_rerun_logs_the_same_losses_bitwise(files, reference, tmp_path):
    workdir = tmp_path / "w"
    args = _args(files, workdir, export=True)
    proc = _start_and_wait_for_checkpoint(args, workdir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at < TOTAL
    r = _run(args)
    assert f"resumed from {workdir} at step" in r.stderr
    want, got = logged_losses(reference), logged_losses(workdir)
    assert sorted(got) == list(range(1, TOTAL + 1)) and got == want  # exact float equality
    a, b = _flat(_params(reference)), _flat(_params(workdir))
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _flat(tree):
    from ftjax import tree as tree_lib

    return dict(sorted(tree_lib.flatten(tree).items()))


def test_sigterm_saves_says_how_to_continue_and_the_rerun_matches(files, reference, tmp_path):
    workdir = tmp_path / "w"
    args = _args(files, workdir, checkpoint_every_steps=2)
    proc = _start_and_wait_for_checkpoint(args, workdir)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("ftjax: stopped by SIGTERM at step") and "run the same command again" in line
    step = int(line.split("at step ")[1].split(":")[0])
    assert (workdir / "checkpoints" / str(step)).is_dir()
    assert "Traceback" not in err
    _run(args)
    assert logged_losses(workdir) == logged_losses(reference)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(files, tmp_path):
    workdir = tmp_path / "w"
    # lr 1e30 blows the weights up at the first update; the next loss is not finite
    r = _run(_args(files, workdir, **{"optimizer.lr": 1e30, "schedule.warmup_steps": 0,
                                      "checkpoint_every_steps": 1}), check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("ftjax: error: train ") and " at step " in line and "is kept" in line
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and max(kept) < bad_step  # nothing saved from the bad step on
    assert "Traceback" not in r.stderr


def test_nonfinite_steps_can_be_skipped(files, tmp_path):
    workdir = tmp_path / "w"
    r = _run(_args(files, workdir, nonfinite="skip", **{"optimizer.lr": 1e30, "schedule.warmup_steps": 0}))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == TOTAL and summary["skipped_steps"] >= 1, r.stderr[-1000:]


def test_resume_on_other_device_counts(files, reference, tmp_path):
    """8 devices until a checkpoint, SIGTERM; then 1 device likewise; then 4 to the end."""
    workdir = tmp_path / "w"
    args = _args(files, workdir, checkpoint_every_steps=2)
    for devices in (8, 1):
        before = _steps(workdir)
        proc = subprocess.Popen(args, cwd=ROOT, env=_env(devices), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _steps(workdir) == before:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=200)
        assert proc.returncode == 75, err[-2000:]
        assert (devices == 8) != ("resumed from" in err)
    r = _run(args, devices=4)
    assert "resumed from" in r.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == TOTAL and summary["num_devices"] == 4
    got, want = logged_losses(workdir), logged_losses(reference)
    assert sorted(got) == list(range(1, TOTAL + 1))
    # another device count sums in another order: equal to rounding, not bitwise
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-4)


def _steps(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_of_eight(files, reference, tmp_path):
    workdir = tmp_path / "w"
    port = _free_port()
    procs = []
    for i in range(2):
        args = _args(files, workdir) + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                        "--num_processes=2", f"--process_id={i}"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=400)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["num_devices"] == 8 and summary["final_step"] == TOTAL
    got, want = logged_losses(workdir), logged_losses(reference)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
