#!/usr/bin/env bash
# Delete the TPU VM (or the queued resource and its TPU VM), after asking, or at once with --yes.
#
# Usage: launch/delete.sh [--name=NAME --zone=ZONE --project=PROJECT] [options]
#
#   --queued          delete the queued resource (with --force: its TPU VM goes too)
#   --queued-id=ID    the queued resource's id (default: the TPU name)
#   --yes, -y         don't ask (needed where there is no terminal to ask on)
#   --async           return without waiting for the deletion to finish
#   --dry-run, -n     print the command instead of running it
#   --help, -h        this text
#
# Fetch the results first (launch/fetch.sh): anything kept only on the workers is lost.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
QUEUED_ID=''
YES=0
ASYNC=0
while (($#)); do
    case $1 in
        --queued) QUEUED=1; OPTSHIFT=1 ;;
        --queued-id | --queued-id=*) opt_value "$@"; QUEUED_ID=$OPTVAL ;;
        -y | --yes) YES=1; OPTSHIFT=1 ;;
        --async) ASYNC=1; OPTSHIFT=1 ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done
require name zone project
((QUEUED)) || [[ -z $QUEUED_ID ]] || die "--queued-id needs --queued"

if ((QUEUED)); then
    what="queued resource ${QUEUED_ID:-$TPU_NAME} and its TPU VM"
    cmd=(gcloud compute tpus queued-resources delete "${QUEUED_ID:-$TPU_NAME}" --zone="$ZONE" --project="$PROJECT" --force)
else
    what="TPU VM $TPU_NAME"
    cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT")
fi
cmd+=(--quiet)  # we asked already; gcloud shouldn't ask again
((ASYNC)) && cmd+=(--async)

if ! ((DRY_RUN || YES)); then
    [[ -t 0 ]] || die "not deleting $what without --yes (no terminal to ask on)"
    read -r -p "Delete $what (zone $ZONE, project $PROJECT)? [y/N] " answer
    if [[ ! $answer =~ ^[Yy]([Ee][Ss])?$ ]]; then
        note "not deleted"
        exit 1
    fi
fi
run "${cmd[@]}"
