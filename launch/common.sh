# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
# Sourced by the launch/*.sh scripts: settings, flag helpers, `run`, and the ftjax command.
#
# Settings come from flags, else from the environment:
#   --name=NAME               FTJAX_TPU_NAME          the TPU VM (also the queued resource's node id)
#   --zone=ZONE               FTJAX_ZONE              e.g. us-central2-b
#   --project=PROJECT         FTJAX_PROJECT           the Google Cloud project id
#   --accelerator-type=TYPE   FTJAX_ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-8
#   --runtime-version=VER     FTJAX_RUNTIME_VERSION   e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite
# A missing one ends the script with one `error:` line and exit status 2.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")

# Where things live on each worker. Single quotes on purpose: $HOME expands there, not here.
# shellcheck disable=SC2016
REMOTE_REPO='$HOME/ftjax'           # the source tree; runs start here, so config paths are repo-relative
# shellcheck disable=SC2016
REMOTE_VENV='$HOME/ftjax-venv'      # Python >= 3.11 (TPU VM images ship 3.10), made by setup.sh
# shellcheck disable=SC2016
REMOTE_LOGS='$HOME/ftjax-logs'      # NAME.log and NAME.pid per run, latest.log/latest.pid -> the last one

DRY_RUN=0
TPU_NAME=${FTJAX_TPU_NAME:-}
ZONE=${FTJAX_ZONE:-}
PROJECT=${FTJAX_PROJECT:-}
ACCELERATOR_TYPE=${FTJAX_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${FTJAX_RUNTIME_VERSION:-}

die() {  # a user mistake: one line, exit 2
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}

fail() {  # something outside went wrong (gcloud, the TPU): one line, exit 1
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

note() {
    printf '%s: %s\n' "$PROG" "$*" >&2
}

usage() {  # the script's header comment, from its second line to the first line that isn't a comment
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "$0"
}

quote() {  # the arguments, each shell-quoted, joined by spaces: bash reads back the same words
    # A word that printf %q leaves alone stays bare; any other goes in '...' (a ' inside as
    # '\''), which means the same as %q's backslashes and reads far better in long --command=s.
    local out='' a q sq="'\\''"
    for a in "$@"; do
        q=$(printf '%q' "$a")
        if [[ $q != "$a" ]]; then
            q="'${a//\'/$sq}'"
        fi
        out+="${out:+ }$q"
    done
    printf '%s' "$out"
}

run() {  # run a command, or under --dry-run print it ("+ " and the quoted words) without running it
    if ((DRY_RUN)); then
        printf '+ %s\n' "$(quote "$@")"
    else
        printf '+ %s\n' "$(quote "$@")" >&2
        "$@"
    fi
}

opt_value() {  # opt_value "$@": the value of $1 (--flag=VALUE or --flag VALUE) in OPTVAL; OPTSHIFT words used
    if [[ $1 == *=* ]]; then
        OPTVAL=${1#*=}
        OPTSHIFT=1
    elif (($# >= 2)); then
        OPTVAL=$2
        OPTSHIFT=2
    else
        die "$1 needs a value ($1=VALUE)"
    fi
}

parse_common() {  # parse_common "$@": handles $1 if it is a common flag (sets OPTSHIFT), else returns 1
    OPTSHIFT=1
    case $1 in
        -h | --help) usage; exit 0 ;;
        -n | --dry-run) DRY_RUN=1 ;;
        --name | --name=*) opt_value "$@"; TPU_NAME=$OPTVAL ;;
        --zone | --zone=*) opt_value "$@"; ZONE=$OPTVAL ;;
        --project | --project=*) opt_value "$@"; PROJECT=$OPTVAL ;;
        --accelerator-type | --accelerator-type=*) opt_value "$@"; ACCELERATOR_TYPE=$OPTVAL ;;
        --runtime-version | --runtime-version=*) opt_value "$@"; RUNTIME_VERSION=$OPTVAL ;;
        *) return 1 ;;
    esac
}

unknown_flag() {
    die "unknown argument: $1 (see $PROG --help)"
}

require() {  # require name zone project ...: every named setting must be set, else one line and exit 2
    local missing=() what
    for what in "$@"; do
        case $what in
            name) [[ -n $TPU_NAME ]] || missing+=("--name (or FTJAX_TPU_NAME)") ;;
            zone) [[ -n $ZONE ]] || missing+=("--zone (or FTJAX_ZONE)") ;;
            project) [[ -n $PROJECT ]] || missing+=("--project (or FTJAX_PROJECT)") ;;
            accelerator) [[ -n $ACCELERATOR_TYPE ]] || missing+=("--accelerator-type (or FTJAX_ACCELERATOR_TYPE)") ;;
            runtime) [[ -n $RUNTIME_VERSION ]] || missing+=("--runtime-version (or FTJAX_RUNTIME_VERSION)") ;;
            *) fail "internal: unknown setting $what" ;;
        esac
    done
    if ((${#missing[@]})); then
        local text=${missing[0]} m
        for m in "${missing[@]:1}"; do
            text+=", $m"
        done
        die "missing setting: $text"
    fi
}

tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND: run a shell command on worker WORKER (a number or all)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --worker="$1" --command="$2"
}

workers_for() {  # the number of hosts (workers) of accelerator type $1; prints nothing if unknown
    local n
    [[ $1 =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] || return 0
    n=${BASH_REMATCH[2]}
    case ${BASH_REMATCH[1]} in
        v2 | v3 | v4 | v5p) echo $((n <= 8 ? 1 : n / 8)) ;;      # 8 cores (TensorCores) per host
        v5litepod | v5e | v6e) echo $((n <= 8 ? 1 : n / 4)) ;;   # up to 8 chips on one host, 4 per host beyond
    esac
}

resolve_workers() {  # resolve_workers N: N if given, else from the accelerator type; sets WORKERS
    WORKERS=${1:-${FTJAX_WORKERS:-}}
    if [[ -z $WORKERS && -n $ACCELERATOR_TYPE ]]; then
        WORKERS=$(workers_for "$ACCELERATOR_TYPE")
        [[ -n $WORKERS ]] || die "cannot tell how many workers a $ACCELERATOR_TYPE has: pass --workers=N"
    fi
    [[ -n $WORKERS ]] || die "missing setting: --accelerator-type (or FTJAX_ACCELERATOR_TYPE), or --workers=N"
    [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, not '$WORKERS'"
}

check_workdir() {  # check_workdir WORKDIR WORKERS: a multi-worker run needs a gs:// workdir
    [[ -n $1 ]] || die "missing --workdir (gs://BUCKET/PATH)"
    if (($2 > 1)) && [[ $1 != gs://* ]]; then
        die "--workdir must be gs://BUCKET/PATH on a TPU with $2 workers, not '$1' (a local path is a different folder on each worker)"
    fi
}

check_config() {  # check_config CONFIG[:ARG] BASE: the config file exists under BASE (not absolute)
    local file=${1%%:*}
    [[ -n $file ]] || die "missing --config (e.g. --config=configs/bert_sst2.py:demo)"
    [[ $file != /* ]] || die "--config must be relative to the repo root (runs start in ~/ftjax on the workers), not '$file'"
    [[ -f $2/$file ]] || die "no config file '$file' under $2"
}

check_override() {  # an ftjax override must look like --config.KEY=VALUE
    [[ $1 =~ ^--config\.[A-Za-z0-9_.]+=.* ]] || die "bad override '$1': use --config.KEY=VALUE"
}

ftjax_args() {  # ftjax_args CONFIG WORKDIR DISTRIBUTED [ARGS...]: sets FTJAX_ARGS (after `python`)
    local config=$1 workdir=$2 distributed=$3
    shift 3
    FTJAX_ARGS=(-m ftjax.main "--config=$config" "--workdir=$workdir")
    if ((distributed)); then
        # The contract with the trainer: --distributed makes ftjax.main call
        # jax.distributed.initialize() (TPU auto-detect) before anything else uses JAX.
        FTJAX_ARGS+=(--distributed)
    fi
    FTJAX_ARGS+=("$@")
}

remote_ftjax() {  # the worker-side shell words of FTJAX_ARGS, run by the venv's Python
    printf '%s' "\"$REMOTE_VENV/bin/python\" $(quote "${FTJAX_ARGS[@]}")"
}

remote_launch() {  # remote_launch RUN_NAME COMMAND_STRING: the worker-side shell line that starts it detached
    # setsid: the run gets its own process group, so stop.sh can end it and its children;
    # nohup + redirects: it outlives the ssh session, which returns at once.
    local name=$1 cmd=$2 log pid
    log="$REMOTE_LOGS/$name.log"
    pid="$REMOTE_LOGS/$name.pid"
    printf '%s' "set -e; mkdir -p \"$REMOTE_LOGS\"; " \
        "if [ -f \"$REMOTE_LOGS/latest.pid\" ] && kill -0 \"\$(cat \"$REMOTE_LOGS/latest.pid\")\" 2>/dev/null; then " \
        "echo \"\$(hostname): a run is still going (pid \$(cat \"$REMOTE_LOGS/latest.pid\")); wait for it or launch/stop.sh\" >&2; exit 1; fi; " \
        "cd \"$REMOTE_REPO\" || { echo \"\$(hostname): no ~/ftjax: run launch/setup.sh first\" >&2; exit 1; }; " \
        "setsid nohup $cmd > \"$log\" 2>&1 < /dev/null & " \
        "echo \$! > \"$pid\"; ln -sfn $(quote "$name.log") \"$REMOTE_LOGS/latest.log\"; " \
        "ln -sfn $(quote "$name.pid") \"$REMOTE_LOGS/latest.pid\"; " \
        "echo \"\$(hostname): started $(quote "$name") (pid \$(cat \"$pid\")), log ~/ftjax-logs/$(quote "$name").log\""
}

check_run_name() {
    [[ $1 =~ ^[A-Za-z0-9._=,+-]+$ ]] || die "bad run name '$1': use letters, digits and . _ = , + -"
}
