"""Shared CLI behaviour: user mistakes end as one `ftjax: error: ...` line, exit status 2."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from ftjax.errors import UserError, one_line


def fail(message: str) -> None:
    print(f"ftjax: error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def user_errors():
    """Turns UserError into one stderr line and exit code 2 (no traceback)."""
    try:
        yield
    except UserError as e:
        fail(str(e))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parser for app.run: bad --config files, keys or values give one line.

    ml_collections raises KeyError / AttributeError / TypeError / ValueError for an
    unknown key or a value of the wrong type in a `--config.x=...` override, and the
    config file's own `get_config(arg)` raises ValueError for a bad arg.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        error = getattr(config, "_error", None)  # ml_collections defers a missing config file
        if error is not None:
            raise flags.Error(f"--config: {error}")
        return rest
    except flags.Error as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # the config file raised: keep its last line
            text = "the config file failed: " + text.strip().splitlines()[-1]
        fail(f"bad flag: {text}")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests KeyErrors
            e = e.args[0]
        text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        if isinstance(e, KeyError):
            key, _, hint = text.partition("\n")
            text = f"unknown key {key}" + (f" ({hint.strip()})" if hint else "")
        fail(f"bad config: {text}")
    except UserError as e:
        fail(str(e))
    return []


def env_int(name: str, default: int) -> int:
    """An integer default for a flag from the environment variable `name` (one line if bad)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        fail(f"{name}={text!r}: give a whole number")
    return int(text)


def compile_cache() -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder, or None when off.

    The folder is $JAX_COMPILATION_CACHE_DIR when set (JAX reads it itself), else
    $FTJAX_CACHE/jax_compile (FTJAX_CACHE: ~/.cache/ftjax). FTJAX_COMPILE_CACHE=0 turns
    it off. A rerun, a resumed run or another point of a sweep with the same shapes then
    loads each executable instead of compiling it (the text demo compiles ~6 s per
    padding bucket). Every program that takes 0.5 s or more to compile is kept.
    """
    if os.environ.get("FTJAX_COMPILE_CACHE", "1") in ("0", "false", "False"):
        return None
    import jax

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not folder:
        root = os.environ.get("FTJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ftjax")
        folder = os.path.join(root, "jax_compile")
        jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, heartbeat_timeout_seconds: int = 30,
                     shutdown_timeout_seconds: int = 300) -> None:
    """jax.distributed.initialize, explicit or auto-detected (TPU VMs, SLURM, ...).

    On the CPU backend the cross-process collectives need gloo, which must be chosen
    before the backend starts. JAX's coordination service then watches every process:
    one that sends no heartbeat for `heartbeat_timeout_seconds` (killed, crashed, hung)
    makes the service abort all the others from C++ with a multi-line log and a stack
    trace; `report_lost_peers` turns that into one line.

    Args:
      coordinator_address, num_processes, process_id: all three, or none to let JAX
        detect the cluster.
      heartbeat_timeout_seconds: how long a silent process counts as alive.
      shutdown_timeout_seconds: how long a finished process waits for the others at exit.
    """
    import jax

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        fail("--distributed: give all of --coordinator_address, --num_processes and --process_id, "
             "or none of them to let JAX detect the cluster")
    for name, value in (("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                        ("shutdown_timeout_seconds", shutdown_timeout_seconds)):
        if value < 1:
            fail(f"--{name}={value}: give a whole number of seconds, at least 1")
    report_lost_peers(heartbeat_timeout_seconds)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects the CPU backend only
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                                   shutdown_timeout_seconds=shutdown_timeout_seconds)
    except (RuntimeError, ValueError) as e:
        fail(f"--distributed: jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}")


# ---- a lost peer in one line ----------------------------------------------------------
#
# JAX's coordination service ends every process of a run when one of them is lost, with
# LOG(FATAL) from a C++ thread: a multi-line status and a stack trace, then SIGABRT. No
# Python code runs at that point (and the client's missed-heartbeat callback cannot be
# set from Python), so a small process between this one and the real stderr passes
# every byte through except such a block, which it replaces by one line at the end.

_FATAL_LINE = re.compile(rb"^F\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_PEER_FATAL = "JAX distributed service detected fatal errors"


def report_lost_peers(heartbeat_timeout_seconds: int) -> None:
    """Routes this process's stderr (fd 2, also C++ logs) through `_stderr_filter`.

    Env FTJAX_RAW_STDERR=1 leaves stderr alone (to see JAX's own fatal block).
    """
    if os.environ.get("FTJAX_RAW_STDERR", "") not in ("", "0"):
        return
    package_parent = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p))
    sys.stderr.flush()
    filt = subprocess.Popen(
        [sys.executable, "-c", f"from ftjax import cli; cli._stderr_filter({heartbeat_timeout_seconds})"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    os.dup2(filt.stdin.fileno(), 2)  # the filter ends when every copy of fd 2 is closed
    filt.stdin.close()


def _stderr_filter(heartbeat_timeout_seconds: int) -> None:
    """stdin -> fd 2, except a coordination-service fatal block, which becomes one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stay to pass on what the run says then
    pending, fatal = b"", None
    while chunk := os.read(0, 1 << 16):
        if fatal is not None:
            fatal += chunk
            continue
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()  # an unfinished line
        for i, line in enumerate(lines):
            if _FATAL_LINE.match(line):
                fatal = b"\n".join(lines[i:] + [pending])
                break
            _write(line + b"\n")
        else:
            if not pending.startswith(b"F"):  # cannot start a fatal line: pass it on now
                _write(pending)
                pending = b""
            continue
        pending = b""
    text = (fatal or b"").decode(errors="replace")
    if _PEER_FATAL in text:
        _write(f"ftjax: error: {describe_peer_loss(text, heartbeat_timeout_seconds)}\n".encode())
    else:
        _write(pending + (fatal or b""))


def _write(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def describe_peer_loss(status: str, heartbeat_timeout_seconds: int) -> str:
    """One line from the coordination service's fatal status: which process was lost."""
    status = status.split("*** Check failure stack trace", 1)[0]
    rerun = ("so this process stopped too; rerun all processes with the same command to continue from "
             "the last checkpoint")
    tail = f"(killed, crashed or hung; see its log), {rerun}"
    listed = re.search(r"unhealthy \(stopped sending heartbeats\):\s*\n((?:[^\n]*\d[ \t]*\n)+)", status)
    if listed:  # the service (on process 0) names them
        ids = [m.group(1) for m in re.finditer(r"(\d+)[ \t]*$", listed.group(1), re.MULTILINE)]
        who = ("process " if len(ids) == 1 else "processes ") + ", ".join(ids)
        return f"lost {who}: no heartbeat for {heartbeat_timeout_seconds} s {tail}"
    if re.search(r"CoordinationService/(PollForError|Heartbeat)\b", status):  # this process's own RPCs
        reason = "it stopped answering" if "DEADLINE_EXCEEDED" in status else "its connection closed"
        return f"lost process 0 (the coordinator): {reason} {tail}"
    first = " ".join(status.split("absl::Status:", 1)[-1].split())[:300]
    return f"JAX's coordination service stopped this run ({first}), {rerun}"


@contextlib.contextmanager
def peer_failures(enabled: bool, heartbeat_timeout_seconds: int):
    """A runtime error in a multi-process run is often a collective whose peer is gone
    (gloo: "Connection reset by peer"): wait for the coordination service's verdict,
    which ends this process with its own line, before letting the error through."""
    try:
        yield
    except Exception as e:
        if enabled:
            import jax

            if isinstance(e, jax.errors.JaxRuntimeError):
                time.sleep(heartbeat_timeout_seconds + 10)
        raise
