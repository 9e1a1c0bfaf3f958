#!/usr/bin/env bash
# One demo-budget run per fine-tuning method, then the table results/demo/methods.md.
#   bash results/demo/run_methods.sh [RUNS_DIR] [METHOD ...]
# Reruns continue finished or interrupted runs from their workdirs (nothing is redone).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-/tmp/ftjax_methods}"
shift || true
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(full linear_probe freeze gradual_unfreezing bitfit layernorm lora ia3 adapter prompt prefix)
for m in "${methods[@]}"; do
  start=$(date +%s)
  python -m ftjax.main --config="configs/bert_sst2.py:demo,method=$m" --workdir="$runs/$m" \
      --config.progress_bar=False
  echo "$(( $(date +%s) - start ))" > "$runs/$m/wall_s.txt"
done
python results/demo/make_methods_table.py "$runs" > results/demo/methods.md
