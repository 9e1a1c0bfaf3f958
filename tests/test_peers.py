"""A run of 2 processes whose peer dies (SIGKILL) or hangs (SIGSTOP).

The survivor must stop within about the heartbeat timeout with one line naming the lost
process, not hang and not print a C++ stack trace; rerunning both processes continues
from the last checkpoint with the same train losses, bitwise, as an uninterrupted run.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from ftjax import cli
from tests.conftest import data_files, logged_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 24
HEARTBEAT = 5  # seconds; the default (30) is for real clusters


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # one compilation cache for the module's runs: only the first pair compiles (~10 s saved a pair)
    return dict(data_files(tmp_path_factory.mktemp("data"), train=64, test=0),
                cache=tmp_path_factory.mktemp("jax_cache"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(files, workdir, port, process_id):
    config = {"model.pretrained": "", "model.variant": "tiny", "model.tokenizer": str(files["vocab"]),
              "data.name": "local_text", "data.data_dir": str(files["data_dir"]),
              "data.files.train": str(files["train"]), "data.files.dev": str(files["dev"]),
              "data.max_length": 16, "data.group_by_length": 0, "batch_size": 16, "eval_batch_size": 16,
              "total_steps": TOTAL, "checkpoint_every_steps": 4, "eval_every_steps": 1000,
              "log_every_steps": 1, "progress_bar": False, "optimizer.lr": 1e-3, "export": False}
    return ([sys.executable, "-m", "ftjax.main", f"--config={ROOT}/configs/bert_sst2.py:demo",
             f"--workdir={workdir}", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={process_id}", f"--heartbeat_timeout_seconds={HEARTBEAT}"]
            + [f"--config.{k}={v}" for k, v in config.items()])


def _start(files, workdir, port):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(files["cache"]), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return [subprocess.Popen(_args(files, workdir, port, i), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs):
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return errs


def _steps(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def _wait_for_checkpoint(procs, workdir):
    deadline = time.time() + 240
    while time.time() < deadline and not _steps(workdir) and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs]
    assert _steps(workdir) and max(_steps(workdir)) < TOTAL


def _lose(procs, victim, sig):
    """Sends `sig` to process `victim`; returns the survivor's stderr and seconds to exit."""
    survivor = procs[1 - victim]
    procs[victim].send_signal(sig)
    start = time.time()
    try:
        err = survivor.communicate(timeout=HEARTBEAT + 60)[1]
        print(f"the survivor of {signal.Signals(sig).name} to process {victim} exited after "
              f"{time.time() - start:.1f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    return survivor.returncode, err, time.time() - start


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _finish(_start(files, workdir, _free_port()))
    return workdir


def _check_one_line(err, pattern):
    assert "Traceback" not in err and "Check failure" not in err and "client.h" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(pattern) and "rerun all processes" in line, err[-3000:]


def test_killed_peer_stops_the_other_with_a_line_and_a_rerun_continues_bitwise(files, reference, tmp_path):
    workdir, port = tmp_path / "w", _free_port()
    procs = _start(files, workdir, port)
    _wait_for_checkpoint(procs, workdir)
    rc, err, seconds = _lose(procs, victim=1, sig=signal.SIGKILL)
    assert rc != 0
    assert seconds < HEARTBEAT + 25, seconds
    _check_one_line(err, "ftjax: error: lost process 1: no heartbeat for 5 s")
    kept = _steps(workdir)
    assert kept and max(kept) < TOTAL
    errs = _finish(_start(files, workdir, port))
    assert "resumed from" in errs[0]
    got, want = logged_losses(workdir), logged_losses(reference)
    assert sorted(got) == list(range(1, TOTAL + 1)) and got == want  # exact float equality


def test_hung_coordinator_stops_the_other_with_a_line(files, tmp_path):
    workdir = tmp_path / "w"
    procs = _start(files, workdir, _free_port())
    _wait_for_checkpoint(procs, workdir)
    rc, err, seconds = _lose(procs, victim=0, sig=signal.SIGSTOP)
    assert rc != 0
    assert seconds < HEARTBEAT + 25, seconds
    _check_one_line(err, "ftjax: error: lost process 0 (the coordinator): it stopped answering")


# The coordination service's fatal statuses as JAX 0.10 prints them (TF_CPP_MIN_LOG_LEVEL=3).
_HEAD = ("F1130 20:53:49.889064    6317 client.h:80] Terminating process because the JAX distributed "
         "service detected fatal errors. This most likely indicates that another task died; see the "
         "other task logs for more details. absl::Status: ")
_STACK = "*** Check failure stack trace: ***\n    @     0x7f41ad420634  absl::LogMessage::SendToLog()\n"
_UNHEALTHY = (_HEAD + "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
              "The tasks have crashed. Check the task logs for an earlier error.\n\n"
              "RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/"
              "tensorflow.CoordinationServiceError='']\n" + _STACK)
_CLOSED = (_HEAD + "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
           "preempted/died/restarted unexpectedly or this task is experiencing network issues.\n"
           "Additional GRPC error information from remote target coordination_service while calling "
           "/xla.coordination.CoordinationService/PollForError:\n:UNKNOWN:Error received from peer  "
           "{grpc_message:\"Socket closed\", grpc_status:14}\n" + _STACK)
_DEADLINE = (_HEAD + "DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/"
             "Heartbeat\n" + _STACK)


@pytest.mark.parametrize("status,start", [
    (_UNHEALTHY, "lost process 1: no heartbeat for 7 s"),
    (_UNHEALTHY.replace("\n1\n", "\n/job:jax_worker/replica:0/task:2\n3\n"),
     "lost processes 2, 3: no heartbeat"),
    (_CLOSED, "lost process 0 (the coordinator): its connection closed"),
    (_DEADLINE, "lost process 0 (the coordinator): it stopped answering"),
    (_HEAD + "INTERNAL: something new\n" + _STACK,
     "JAX's coordination service stopped this run (INTERNAL: something new), so this process"),
])
def test_the_fatal_status_becomes_one_line(status, start):
    line = cli.describe_peer_loss(status, 7)
    assert line.startswith(start) and "\n" not in line, line


def _filter(data: bytes) -> bytes:
    code = "from ftjax import cli; cli._stderr_filter(7)"
    r = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, cwd=ROOT,
                       timeout=60, check=False)
    return r.stderr


def test_the_stderr_filter_passes_everything_else_through():
    before = b"resumed from W at step 4\n\r 10%|#  | 4/40 [00:01<00:09]\rFound no F line here\n"
    assert _filter(before) == before
    out = _filter(before + _UNHEALTHY.encode())
    assert out == before + b"ftjax: error: " + cli.describe_peer_loss(_UNHEALTHY, 7).encode() + b"\n"
    other = b"F1130 20:53:49.889064    6317 foo.cc:1] Check failed: x\n" + _STACK.encode()
    assert _filter(before + other) == before + other  # another fatal error stays as it was
