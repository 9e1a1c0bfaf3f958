#!/usr/bin/env bash
# Show a run's log from the TPU workers: worker 0's by default, followed (tail -F) until Ctrl-C.
#
# Usage: launch/logs.sh [--name=NAME --zone=ZONE --project=PROJECT] [options]
#
#   --run-name=NAME   which run (default: the last one run.sh or sweep.sh started)
#   --worker=N        which worker (default 0)
#   --all             every worker at once, each line prefixed with the worker's hostname
#   --lines=N         start with the last N lines (default 100)
#   --no-follow       print and return instead of following
#   --dry-run, -n     print the command instead of running it
#   --help, -h        this text
#
# The logs live on each worker in ~/ftjax-logs/RUN.log (latest.log: the last run).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RUN_NAME=latest
WORKER=0
LINES=100
FOLLOW=1
while (($#)); do
    case $1 in
        --run-name | --run-name=*) opt_value "$@"; RUN_NAME=$OPTVAL ;;
        --worker | --worker=*) opt_value "$@"; WORKER=$OPTVAL ;;
        --all) WORKER=all; OPTSHIFT=1 ;;
        --lines | --lines=*) opt_value "$@"; LINES=$OPTVAL ;;
        --no-follow) FOLLOW=0; OPTSHIFT=1 ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done
require name zone project
check_run_name "$RUN_NAME"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number or all, not '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a whole number, not '$LINES'"

LOG="$REMOTE_LOGS/$RUN_NAME.log"
# -F follows the name, so it keeps up when latest.log is pointed at a newer run.
TAIL="tail -n $LINES"
if ((FOLLOW)); then
    TAIL+=" -F"
fi
TAIL+=" \"$LOG\""
if [[ $WORKER == all ]]; then
    TAIL+=" 2>&1 | sed -u \"s/^/\$(hostname): /\""
fi
tpu_ssh "$WORKER" "$TAIL"
