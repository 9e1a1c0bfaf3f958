#!/usr/bin/env bash
# The CPU-scale tables: every sweep, then every report, from the repository root.
#
#   bash results/tables/run_all.sh [sweeps|reports]    (default: both)
#
# Sweeps write their points under results/tables/runs/TABLE/ (or $FTJAX_TABLES_RUNS/TABLE).
# A point with a summary.json is done and skipped, an interrupted one resumes from its
# checkpoint, so this script continues where a killed one stopped. Each point's records
# (summary.json, config.json, sweep.json, metrics.jsonl) are committed as they land; the
# rest of a workdir is git-ignored (runs/.gitignore). Each sweep runs twice: the second
# pass retries a point that failed (and, for T-methods, runs the tune stage's seeds).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${FTJAX_TABLES_RUNS:-results/tables/runs}"
python="${PYTHON:-python}"

sweeps=(
  "configs/grids/t_methods.py t_methods"
  "configs/grids/t_size.py t_size"
  "configs/grids/t_vision.py t_vision"
  "configs/grids/t_data.py:text t_data_text"
  "configs/grids/t_data.py:vision t_data_vision"
  "configs/grids/t_topic.py t_topic"
  "configs/grids/t_size.py:mpnet t_size"
)

run_sweeps() {
  local spec grid root
  for spec in "${sweeps[@]}"; do
    read -r grid root <<<"$spec"
    for pass in 1 2; do
      echo "# $(date '+%F %T') $grid -> $runs/$root (pass $pass)"
      nice -n 10 "$python" -m ftjax.sweep --grid="$grid" --root="$runs/$root" || true
    done
  done
}

run_reports() {
  local out=results/tables
  "$python" -m ftjax.report "$runs/t_methods" --tuned --papers="$out/papers/t_methods.yaml" --out="$out/t_methods"
  "$python" -m ftjax.report "$runs/t_size" --papers="$out/papers/t_size.yaml" --out="$out/t_size"
  "$python" -m ftjax.report "$runs/t_vision" --out="$out/t_vision"
  "$python" -m ftjax.report "$runs/t_data_text" --x=data.train_limit --series=model.dont_load \
    '--name=(head/.*,)=pretrained' '--name=(.*,)=from scratch' --out="$out/t_data_text"
  "$python" -m ftjax.report "$runs/t_data_vision" --x=data.train_limit --series=model.dont_load \
    '--name=(head/.*,)=pretrained' '--name=(.*,)=from scratch' --out="$out/t_data_vision"
  "$python" -m ftjax.report "$runs/t_topic" --out="$out/t_topic"
}

case "${1:-all}" in
  sweeps) run_sweeps ;;
  reports) run_reports ;;
  all) run_sweeps; run_reports ;;
  *) echo "usage: bash results/tables/run_all.sh [sweeps|reports]" >&2; exit 2 ;;
esac
