#!/usr/bin/env bash
# The accent demo once per fine-tuning method, then the table results/speech/methods.md.
#   bash results/speech/run_methods.sh [RUNS_DIR] [METHOD ...]
# Reruns continue finished or interrupted runs from their workdirs (nothing is redone).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-/tmp/ftjax_speech_methods}"
shift || true
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(full freeze lora adapter bitfit)
for m in "${methods[@]}"; do
  start=$(date +%s)
  python -m ftjax.main --config="configs/whisper_accent.py:demo,method=$m" --workdir="$runs/$m" \
      --config.progress_bar=False
  echo "$(( $(date +%s) - start ))" > "$runs/$m/wall_s.txt"
done
dirs=()
for m in "${methods[@]}"; do dirs+=("$runs/$m"); done
python results/speech/table.py "${dirs[@]}" > results/speech/methods.md
