#!/usr/bin/env bash
# Create a Cloud TPU VM for ftjax and wait until it is READY.
#
# Usage: launch/create.sh [--name=NAME --zone=ZONE --project=PROJECT
#                          --accelerator-type=TYPE --runtime-version=VERSION] [options]
#
#   --queued            request it as a queued resource (waits in the queue for capacity)
#   --queued-id=ID      the queued resource's id (default: the TPU name)
#   --spot              a Spot TPU (cheaper, can be preempted at any time)
#   --preemptible       a preemptible TPU (tpu-vm only; with --queued use --spot)
#   --no-wait           return once the request is made, don't poll until ready
#   --timeout=SECONDS   give up waiting after this long (default 3600; 0: wait forever)
#   --poll=SECONDS      seconds between state checks (default 30)
#   --dry-run, -n       print the gcloud commands instead of running them
#   --help, -h          this text
#
# Settings come from the flags or FTJAX_TPU_NAME, FTJAX_ZONE, FTJAX_PROJECT,
# FTJAX_ACCELERATOR_TYPE, FTJAX_RUNTIME_VERSION. Example:
#   launch/create.sh --name=ft-1 --zone=us-central2-b --project=my-proj \
#       --accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
QUEUED_ID=''
SPOT=0
PREEMPTIBLE=0
WAIT=1
TIMEOUT=3600
POLL=30
while (($#)); do
    case $1 in
        --queued) QUEUED=1; OPTSHIFT=1 ;;
        --queued-id | --queued-id=*) opt_value "$@"; QUEUED_ID=$OPTVAL ;;
        --spot) SPOT=1; OPTSHIFT=1 ;;
        --preemptible) PREEMPTIBLE=1; OPTSHIFT=1 ;;
        --no-wait) WAIT=0; OPTSHIFT=1 ;;
        --timeout | --timeout=*) opt_value "$@"; TIMEOUT=$OPTVAL ;;
        --poll | --poll=*) opt_value "$@"; POLL=$OPTVAL ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done

require name zone project accelerator runtime
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds, not '$TIMEOUT'"
[[ $POLL =~ ^[1-9][0-9]*$ ]] || die "--poll must be a positive whole number of seconds, not '$POLL'"
((SPOT && PREEMPTIBLE)) && die "choose one of --spot and --preemptible"
((QUEUED && PREEMPTIBLE)) && die "--preemptible is for tpu-vm create; with --queued use --spot"
((QUEUED)) || [[ -z $QUEUED_ID ]] || die "--queued-id needs --queued"
QUEUED_ID=${QUEUED_ID:-$TPU_NAME}
WHERE=(--zone="$ZONE" --project="$PROJECT")

if ((QUEUED)); then
    # Note the flag names differ: queued-resources takes --runtime-version, tpu-vm create --version.
    cmd=(gcloud compute tpus queued-resources create "$QUEUED_ID" --node-id="$TPU_NAME" "${WHERE[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
    ((SPOT)) && cmd+=(--spot)
    describe=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${WHERE[@]}" --format='value(state.state)')
    ready=ACTIVE
    failed='FAILED SUSPENDING SUSPENDED'
else
    cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    ((SPOT)) && cmd+=(--spot)
    ((PREEMPTIBLE)) && cmd+=(--preemptible)
    describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)')
    ready=READY
    failed='PREEMPTED TERMINATED DELETING STOPPED STOPPING'
fi

run "${cmd[@]}"
if ((DRY_RUN)); then
    ((WAIT)) && printf '# then poll every %ss until %s: %s\n' "$POLL" "$ready" "$(quote "${describe[@]}")"
    exit 0
fi
((WAIT)) || exit 0

start=$SECONDS
while :; do
    state=$("${describe[@]}" 2>/dev/null || true)
    state=${state//[[:space:]]/}
    if [[ $state == "$ready" ]]; then
        note "$TPU_NAME is $state; next: launch/setup.sh"
        exit 0
    fi
    if [[ -n $state && " $failed " == *" $state "* ]]; then
        fail "$TPU_NAME is $state; delete it (launch/delete.sh) and create it again"
    fi
    if ((TIMEOUT && SECONDS - start >= TIMEOUT)); then
        fail "$TPU_NAME not $ready after ${TIMEOUT}s (state: ${state:-unknown}); it may still come up: $(quote "${describe[@]}")"
    fi
    note "waiting for $ready (state: ${state:-unknown}, $((SECONDS - start))s)"
    sleep "$POLL"
done
