"""Shared CLI behaviour: user mistakes end as one `ftjax: error: ...` line, exit status 2."""

from __future__ import annotations

import contextlib
import sys

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


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """jax.distributed.initialize, explicit or auto-detected (TPU VMs, SLURM, ...).

    On the CPU backend the cross-process collectives need gloo, which must be chosen
    before the backend starts.
    """
    import jax

    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        fail("--distributed: give all of --coordinator_address, --num_processes and --process_id, "
             "or none of them to let JAX detect the cluster")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects the CPU backend only
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (RuntimeError, ValueError) as e:
        fail(f"--distributed: jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}")
