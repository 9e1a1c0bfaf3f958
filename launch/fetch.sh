#!/usr/bin/env bash
# Copy a run's results (summary.json, metrics.jsonl, config.json) from its workdir to a local
# folder, DEST/RUN where RUN is the workdir's last folder.
#
# Usage: launch/fetch.sh --workdir=gs://BUCKET/PATH [--workdir=...] [--dest=DIR] [options]
#        launch/fetch.sh gs://BUCKET/PATH ...
#
#   --workdir=DIR     the run's workdir (repeat it, or list several, for a sweep's runs);
#                     gs:// is read with `gcloud storage cp`; any other path is taken as a
#                     folder on worker 0 of the TPU VM and copied with `tpu-vm scp`
#   --dest=DIR        the local results folder (default: ftjax-results)
#   --gsutil          use `gsutil cp` instead of `gcloud storage cp`
#   --dry-run, -n     print the commands instead of running them
#   --help, -h        this text
#
# Exits 1 when a run has no summary.json (not finished, or failed); a missing
# metrics.jsonl or config.json is only reported.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FILES=(summary.json metrics.jsonl config.json)
WORKDIRS=()
DEST=ftjax-results
GSUTIL=0
while (($#)); do
    case $1 in
        --workdir | --workdir=*) opt_value "$@"; WORKDIRS+=("$OPTVAL") ;;
        --dest | --dest=*) opt_value "$@"; DEST=$OPTVAL ;;
        --gsutil) GSUTIL=1; OPTSHIFT=1 ;;
        -*) parse_common "$@" || unknown_flag "$1" ;;
        *) WORKDIRS+=("$1"); OPTSHIFT=1 ;;
    esac
    shift "$OPTSHIFT"
done
((${#WORKDIRS[@]})) || die "missing --workdir (gs://BUCKET/PATH)"
for w in "${WORKDIRS[@]}"; do
    [[ $w == gs://* ]] || require name zone project
done

unfinished=()
for w in "${WORKDIRS[@]}"; do
    w=${w%/}
    out=$DEST/$(basename "$w")
    run mkdir -p "$out"
    for f in "${FILES[@]}"; do
        if [[ $w == gs://* ]]; then
            if ((GSUTIL)); then
                cmd=(gsutil -q cp "$w/$f" "$out/$f")
            else
                cmd=(gcloud storage cp "$w/$f" "$out/$f")
            fi
        else
            cmd=(gcloud compute tpus tpu-vm scp "$TPU_NAME:$w/$f" "$out/$f"
                --zone="$ZONE" --project="$PROJECT" --worker=0)
        fi
        if ! run "${cmd[@]}"; then
            if [[ $f == summary.json ]]; then
                unfinished+=("$w")
            else
                note "no $f in $w"
            fi
        fi
    done
done
((DRY_RUN)) && exit 0
if ((${#unfinished[@]})); then
    fail "no summary.json (not finished, or failed) in: ${unfinished[*]}"
fi
note "results in $DEST/"
