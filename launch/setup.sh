#!/usr/bin/env bash
# Install ftjax on every worker of a TPU VM (--worker=all): the source in ~/ftjax, a Python
# 3.11 venv in ~/ftjax-venv with ftjax (editable) and jax[tpu]. Rerun it after you commit.
#
# Usage: launch/setup.sh [--name=NAME --zone=ZONE --project=PROJECT] [options]
#
#   --ref=REF           what to install (default HEAD): `git archive REF` of this checkout is
#                       copied to the workers with `tpu-vm scp`; uncommitted edits are not
#   --git-url=URL       instead, each worker clones URL and checks out --ref (default: the
#                       remote's default branch); for a ref your checkout doesn't have
#   --python=VERSION    the venv's Python (default 3.11; ftjax needs >= 3.11)
#   --dry-run, -n       print the commands instead of running them
#   --help, -h          this text
#
# Example: launch/setup.sh --name=ft-1 --zone=us-central2-b --project=my-proj
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REF=''
GIT_URL=''
PYTHON_VERSION=3.11
while (($#)); do
    case $1 in
        --ref | --ref=*) opt_value "$@"; REF=$OPTVAL ;;
        --git-url | --git-url=*) opt_value "$@"; GIT_URL=$OPTVAL ;;
        --python | --python=*) opt_value "$@"; PYTHON_VERSION=$OPTVAL ;;
        *) parse_common "$@" || unknown_flag "$1" ;;
    esac
    shift "$OPTSHIFT"
done
require name zone project
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.11, not '$PYTHON_VERSION'"

# The install, in one place. TPU VM images ship Python 3.10, so uv (from PyPI) makes the
# 3.11 venv; `jax[tpu]` pulls libtpu, and ftjax's own pin on jax keeps the two in step.
INSTALL="python3 -m pip install --user --quiet --upgrade uv && "
INSTALL+="{ [ -x \"$REMOTE_VENV/bin/python\" ] || \"\$HOME/.local/bin/uv\" venv --python $PYTHON_VERSION \"$REMOTE_VENV\"; } && "
INSTALL+="\"\$HOME/.local/bin/uv\" pip install --python \"$REMOTE_VENV/bin/python\" -e \"$REMOTE_REPO\" 'jax[tpu]' && "
INSTALL+="cd \"$REMOTE_REPO\" && \"$REMOTE_VENV/bin/python\" -c 'import ftjax, jax; print(\"ftjax on\", jax.__version__)'"

if [[ -n $GIT_URL ]]; then
    FETCH="rm -rf \"$REMOTE_REPO\" && git clone --quiet $(quote "$GIT_URL") \"$REMOTE_REPO\""
    if [[ -n $REF ]]; then
        FETCH+=" && git -C \"$REMOTE_REPO\" checkout --quiet $(quote "$REF")"
    fi
else
    REF=${REF:-HEAD}
    git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}" >/dev/null \
        || die "--ref '$REF' is not a commit of $REPO_ROOT"
    if [[ $REF == HEAD && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
        note "uncommitted changes are not copied (git archive of HEAD); commit them first to include them"
    fi
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    TARBALL=$TMP/ftjax-src.tar.gz
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" "$REF"
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:ftjax-src.tar.gz" --zone="$ZONE" --project="$PROJECT" --worker=all
    FETCH="rm -rf \"$REMOTE_REPO\" && mkdir -p \"$REMOTE_REPO\" && tar -xzf \"\$HOME/ftjax-src.tar.gz\" -C \"$REMOTE_REPO\""
fi

tpu_ssh all "set -e; $FETCH && $INSTALL"
((DRY_RUN)) || note "installed on every worker of $TPU_NAME; next: launch/run.sh"
