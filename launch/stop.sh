#!/usr/bin/env bash
# Stop a run (or a sweep) on every worker: SIGTERM to the process group run.sh started.
#
# Usage: launch/stop.sh [--name=NAME --zone=ZONE --project=PROJECT] [--run-name=NAME] [options]
#
#   --run-name=NAME   which run (default: the last one run.sh or sweep.sh started)
#   --dry-run, -n     print the command instead of running it
#   --help, -h        this text
#
# The run's checkpoints stay in its workdir: run.sh with the same workdir continues it.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=latest
while (($#)); do
    case $1 in
        --run-name | --run-name=*) opt_value "$@"; RUN_NAME=$OPTVAL ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done
require name zone project
check_run_name "$RUN_NAME"

PIDFILE="$REMOTE_LOGS/$RUN_NAME.pid"
tpu_ssh all "p=\$(cat \"$PIDFILE\" 2>/dev/null) || { echo \"\$(hostname): no $RUN_NAME run\"; exit 0; }; \
if kill -0 \"\$p\" 2>/dev/null; then kill -TERM -- \"-\$p\" 2>/dev/null || kill -TERM \"\$p\"; \
echo \"\$(hostname): stopped $RUN_NAME (pid \$p)\"; else echo \"\$(hostname): $RUN_NAME had ended\"; fi"
