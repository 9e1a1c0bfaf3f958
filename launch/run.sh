#!/usr/bin/env bash
# Run an ftjax config on every worker of a TPU VM at once, detached (nohup), each worker
# logging to ~/ftjax-logs/RUN.log. Returns when all workers have started; follow it with
# launch/logs.sh, collect it with launch/fetch.sh.
#
# Usage: launch/run.sh --config=CONFIG[:ARG] --workdir=gs://BUCKET/PATH [--config.KEY=VALUE ...]
#                      [--name=NAME --zone=ZONE --project=PROJECT --accelerator-type=TYPE] [options]
#
#   --config=FILE[:ARG]   the config, relative to the repo root (e.g. configs/bert_sst2.py:demo)
#   --workdir=gs://...    where the run writes; must be gs:// when the TPU has several workers
#   --config.KEY=VALUE    config overrides, passed on as they are (any number)
#   --run-name=NAME       the log's name (default: the workdir's last folder)
#   --workers=N           workers (hosts) of the TPU (default: from --accelerator-type)
#   --distributed / --no-distributed
#                         pass --distributed to ftjax.main, which then calls
#                         jax.distributed.initialize() (default: on when workers > 1)
#   -- ARGS...            anything after -- goes to ftjax.main unchanged
#   --dry-run, -n         print the commands instead of running them
#   --help, -h            this text
#
# Example:
#   launch/run.sh --config=configs/bert_sst2.py:demo --workdir=gs://my-bucket/ftjax/demo \
#       --config.optimizer.lr=3e-5
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=''
WORKDIR=''
RUN_NAME=''
WORKERS_FLAG=''
DISTRIBUTED=auto
EXTRA=()
while (($#)); do
    case $1 in
        --config | --config=*) opt_value "$@"; CONFIG=$OPTVAL ;;
        --workdir | --workdir=*) opt_value "$@"; WORKDIR=$OPTVAL ;;
        --run-name | --run-name=*) opt_value "$@"; RUN_NAME=$OPTVAL ;;
        --workers | --workers=*) opt_value "$@"; WORKERS_FLAG=$OPTVAL ;;
        --distributed) DISTRIBUTED=1; OPTSHIFT=1 ;;
        --no-distributed) DISTRIBUTED=0; OPTSHIFT=1 ;;
        --config.*) check_override "$1"; EXTRA+=("$1"); OPTSHIFT=1 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done

require name zone project
resolve_workers "$WORKERS_FLAG"
check_config "$CONFIG" "$REPO_ROOT"
check_workdir "$WORKDIR" "$WORKERS"
[[ $DISTRIBUTED != auto ]] || DISTRIBUTED=$((WORKERS > 1))
RUN_NAME=${RUN_NAME:-$(basename "${WORKDIR%/}")}
check_run_name "$RUN_NAME"

ftjax_args "$CONFIG" "$WORKDIR" "$DISTRIBUTED" "${EXTRA[@]}"
tpu_ssh all "$(remote_launch "$RUN_NAME" "$(remote_ftjax)")"
((DRY_RUN)) || note "started $RUN_NAME on $WORKERS worker(s); follow it: launch/logs.sh --run-name=$RUN_NAME"
