"""Fine-tune a model: python -m ftjax.main --config=configs/bert_sst2.py:demo --workdir=W.

Kept short on purpose: the logic lives in ftjax.train, importable and testable.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ftjax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results (local or gs://).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("FTJAX_DISTRIBUTED", "") not in ("", "0"),
    "Call jax.distributed.initialize() first (multi-host). On TPU VMs and SLURM/Kubernetes "
    "clusters JAX detects the rest; elsewhere give --coordinator_address, --num_processes "
    "and --process_id. Default: env FTJAX_DISTRIBUTED.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0-based (with --distributed).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", cli.env_int("FTJAX_HEARTBEAT_TIMEOUT_SECONDS", 30),
    "With --distributed: a process silent this long counts as lost (killed, crashed, hung) and "
    "the others stop with a line naming it. Default: env FTJAX_HEARTBEAT_TIMEOUT_SECONDS or 30.")
_SHUTDOWN = flags.DEFINE_integer(
    "shutdown_timeout_seconds", cli.env_int("FTJAX_SHUTDOWN_TIMEOUT_SECONDS", 300),
    "With --distributed: how long a finished process waits for the others at exit. "
    "Default: env FTJAX_SHUTDOWN_TIMEOUT_SECONDS or 300.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run the same command again


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO
    with cli.user_errors(), cli.peer_failures(_DISTRIBUTED.value, _HEARTBEAT.value):
        cli.compile_cache()
        if _DISTRIBUTED.value:
            cli.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                 _HEARTBEAT.value, _SHUTDOWN.value)
        from ftjax import train

        try:
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        except train.Preempted as e:
            print(f"ftjax: {e}", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
