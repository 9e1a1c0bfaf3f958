#!/usr/bin/env bash
# Fan a grid of config overrides out to runs: the cartesian product of the --grid values, one
# run per cell, each in its own workdir WORKDIR_ROOT/CELL named from its overrides
# (e.g. method-lora_optimizer.lr-1e-4). The runs go one after another, on the TPU VM's
# workers (detached, like run.sh) or, with --local, on this machine.
#
# Usage: launch/sweep.sh --config=CONFIG[:ARG] --workdir-root=gs://BUCKET/PATH
#                        --grid 'config.KEY=V1,V2,...' [--grid ...] [--config.KEY=VALUE ...] [options]
#
#   --grid KEY=V1,V2    one axis of the grid (repeat for more); KEY with or without "config."
#   --grid-file=G.py[:ARG]  the runs of a grid file of `python -m ftjax.sweep` (points x seeds,
#                       the same workdir names; --config may then be left out when the grid
#                       names one); its tune stage is listed once the grid's summaries are
#                       readable under the root (fetch them, or run ftjax.sweep locally)
#   --config.KEY=VALUE  an override for every run
#   --local             run here with `PYTHON -m ftjax.main` instead of on the TPU VM
#   --python=PATH       the Python for --local (default: $FTJAX_PYTHON, else python)
#   --run-name=NAME     the sweep's log on the workers (default: the root's last folder);
#                       each run also logs to ~/ftjax-logs/CELL.log
#   --workers=N, --distributed, --no-distributed, -- ARGS...   as in run.sh
#   --dry-run, -n       print every run's command instead of running it
#   --help, -h          this text
#
# A failed run doesn't stop the sweep. Rerunning the sweep continues each run from its
# workdir's checkpoint (finished ones train no further). Example:
#   launch/sweep.sh --config=configs/bert_sst2.py:demo --workdir-root=gs://my-bucket/sweep \
#       --grid 'config.method=lora,full' --grid 'config.optimizer.lr=1e-4,3e-4'
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=''
ROOT=''
GRIDS=()
GRID_FILE=''
FIXED=()
LOCAL=0
PYTHON=${FTJAX_PYTHON:-python}
RUN_NAME=''
WORKERS_FLAG=''
DISTRIBUTED=auto
while (($#)); do
    case $1 in
        --config | --config=*) opt_value "$@"; CONFIG=$OPTVAL ;;
        --workdir-root | --workdir-root=*) opt_value "$@"; ROOT=$OPTVAL ;;
        --grid | --grid=*) opt_value "$@"; GRIDS+=("$OPTVAL") ;;
        --grid-file | --grid-file=*) opt_value "$@"; GRID_FILE=$OPTVAL ;;
        --local) LOCAL=1; OPTSHIFT=1 ;;
        --python | --python=*) opt_value "$@"; PYTHON=$OPTVAL ;;
        --run-name | --run-name=*) opt_value "$@"; RUN_NAME=$OPTVAL ;;
        --workers | --workers=*) opt_value "$@"; WORKERS_FLAG=$OPTVAL ;;
        --distributed) DISTRIBUTED=1; OPTSHIFT=1 ;;
        --no-distributed) DISTRIBUTED=0; OPTSHIFT=1 ;;
        --config.*) check_override "$1"; FIXED+=("$1"); OPTSHIFT=1 ;;
        --) shift; FIXED+=("$@"); break ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done

[[ -n $ROOT ]] || die "missing --workdir-root (gs://BUCKET/PATH, or a folder with --local)"
ROOT=${ROOT%/}
CELL_ARGS=()  # with --grid-file: each cell's --config.KEY=VALUE words, tab-separated
if [[ -n $GRID_FILE ]]; then
    ((${#GRIDS[@]} == 0)) || die "give --grid axes or --grid-file, not both"
    listing=$("$PYTHON" -m ftjax.sweep --grid="$GRID_FILE" --root="$ROOT" ${CONFIG:+"--config=$CONFIG"} --list) \
        || die "could not list the points of --grid-file=$GRID_FILE"
    cells=()
    names=()
    while IFS=$'\t' read -r -a words; do
        ((${#words[@]} >= 3)) || continue
        names+=("${words[0]}")
        cells+=("${words[0]}")
        [[ -n $CONFIG ]] || CONFIG=${words[1]#--config=}
        CELL_ARGS+=("$(printf '%s\t' "${words[@]:3}")")
    done <<<"$listing"
    ((${#cells[@]})) || die "--grid-file=$GRID_FILE lists no points"
fi
[[ -n $CONFIG ]] || die "missing --config=CONFIG[:ARG]"
[[ -n $GRID_FILE ]] || ((${#GRIDS[@]})) || die "missing --grid 'config.KEY=V1,V2' (one per axis) or --grid-file"
if ((LOCAL)); then
    check_config "$CONFIG" .
    WORKERS=1
    [[ $DISTRIBUTED != auto ]] || DISTRIBUTED=0
else
    require name zone project
    resolve_workers "$WORKERS_FLAG"
    check_config "$CONFIG" "$REPO_ROOT"
    check_workdir "$ROOT" "$WORKERS"
    [[ $DISTRIBUTED != auto ]] || DISTRIBUTED=$((WORKERS > 1))
fi

if [[ -z $GRID_FILE ]]; then
    # The cartesian product, first --grid outermost. A cell is its "KEY=VALUE" lines.
    cells=('')
    keys=' '
    for grid in "${GRIDS[@]}"; do
        [[ $grid == *=* ]] || die "bad --grid '$grid': use KEY=V1,V2,..."
        key=${grid%%=*}
        key=${key#--}
        key=${key#config.}
        [[ $key =~ ^[A-Za-z0-9_][A-Za-z0-9_.]*$ ]] || die "bad --grid key '${grid%%=*}': use config.KEY"
        [[ $keys != *" $key "* ]] || die "--grid $key given twice"
        keys+="$key "
        values=${grid#*=}
        [[ -n $values && $values != ,* && $values != *, && $values != *,,* ]] \
            || die "bad --grid '$grid': empty value (values are split on commas)"
        IFS=, read -r -a vals <<<"$values"
        next=()
        for cell in "${cells[@]}"; do
            for v in "${vals[@]}"; do
                next+=("${cell:+$cell$'\n'}$key=$v")
            done
        done
        cells=("${next[@]}")
    done

    cell_name() {  # the workdir folder of a cell: KEY-VALUE pairs joined by _, other characters -> -
        local name='' line
        while IFS= read -r line; do
            line="${line%%=*}-${line#*=}"
            name+="${name:+_}${line//[^A-Za-z0-9.-]/-}"
        done <<<"$1"
        printf '%s' "$name"
    }

    names=()
    for cell in "${cells[@]}"; do  # all names first: a clash stops the sweep before any run starts
        name=$(cell_name "$cell")
        for seen in "${names[@]}"; do
            [[ $seen != "$name" ]] || die "two cells get the same workdir name '$name'; make the values differ in letters, digits, . or -"
        done
        names+=("$name")
    done
fi

workdirs=()
failed=()
chain=''
n=${#cells[@]}
for ((i = 1; i <= n; i++)); do
    cell=${cells[i - 1]}
    name=${names[i - 1]}
    workdirs+=("$ROOT/$name")
    overrides=()
    if [[ -n $GRID_FILE ]]; then
        IFS=$'\t' read -r -a overrides <<<"${CELL_ARGS[i - 1]}"
    else
        while IFS= read -r line; do
            overrides+=("--config.$line")
        done <<<"$cell"
    fi
    ftjax_args "$CONFIG" "$ROOT/$name" "$DISTRIBUTED" "${FIXED[@]}" "${overrides[@]}"
    if ((LOCAL)); then
        note "run $i/$n: $name"
        if ! run "$PYTHON" "${FTJAX_ARGS[@]}"; then
            note "run $i/$n failed: $name"
            failed+=("$name")
        fi
    else
        ((DRY_RUN)) && printf '# run %d/%d: %s\n' "$i" "$n" "$(remote_ftjax)"
        chain+="echo \"[$i/$n] $name: start \$(date -Is)\"; "
        chain+="$(remote_ftjax) > \"$REMOTE_LOGS/$name.log\" 2>&1 < /dev/null; "
        chain+="echo \"[$i/$n] $name: exit \$? \$(date -Is)\"; "
    fi
done

if ((LOCAL)); then
    ((DRY_RUN)) && exit 0
    if ((${#failed[@]})); then
        fail "${#failed[@]} of $n runs failed: ${failed[*]}"
    fi
    note "$n runs done under $ROOT"
    exit 0
fi

RUN_NAME=${RUN_NAME:-$(basename "$ROOT")}
check_run_name "$RUN_NAME"
# The whole sweep is one detached shell per worker, so the runs go in order without an ssh
# session held open; every worker walks the same list, so a multi-worker run starts together.
tpu_ssh all "$(remote_launch "$RUN_NAME" "bash -c $(quote "$chain")")"
((DRY_RUN)) && exit 0
note "started $n runs on $TPU_NAME; progress: launch/logs.sh --run-name=$RUN_NAME; one run: launch/logs.sh --run-name=CELL"
note "then: launch/fetch.sh $(quote "${workdirs[@]}")"
