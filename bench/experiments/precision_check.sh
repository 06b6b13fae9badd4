#!/usr/bin/env bash
# Does CPU bf16 (autocast + bf16 hidden states) train the same model as fp32? One pretrained start,
# four continued runs on the same shards, compared in docs/benchmarks.md:
#   A  default (bf16 autocast, bf16 hidden states)   B  bf16 autocast, fp32 hidden states
#   C  --precision fp32                              D  as A with another --seed (the noise floor)
# Usage: bash bench/experiments/precision_check.sh [WORK_DIR] [CORPUS]   (about 15 minutes on 2 cores)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$repo/bench/out/work/precision_check}
corpus=${2:-$repo/../shared/data/clue_small_2500.txt}
py=$repo/.venv/bin/python
export OMP_NUM_THREADS=1
rm -rf "$work" && mkdir -p "$work"
"$py" -m cpt init-base "$work/base" --preset small --seed 0
# a briefly pretrained start (random weights would hide what rounding does to a trained model)
"$py" -m cpt run --corpus "$corpus" --base-model "$work/base" --output "$work/pre" --max-seq-length 128 \
  --max-steps 600 --lr 5e-4 --warmup-steps 60 --global-batch-size 16 --micro-batch-size 16 \
  --eval-interval 200 --save-interval 600 --no-into-base
common=(--base-model "$work/pre/model" --max-steps 300 --lr 1e-4 --warmup-steps 30 --global-batch-size 16
        --micro-batch-size 16 --eval-interval 50 --save-interval 300 --eval-max-sequences 256)
for variant in A B C D; do mkdir -p "$work/$variant" && cp -r "$work/pre/corpus" "$work/pre/shards" "$work/$variant/"; done
"$py" -m cpt train --output "$work/A" "${common[@]}"
"$py" -c 'import sys, cpt.training.cpu as c; c.keep_cpu_activations_in_bf16 = lambda model: None
from cpt.cli import main; sys.argv = ["cpt", *sys.argv[1:]]; main()' train --output "$work/B" "${common[@]}"
"$py" -m cpt train --output "$work/C" "${common[@]}" --precision fp32
"$py" -m cpt train --output "$work/D" "${common[@]}" --seed 43
"$py" - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
runs = {v: [json.loads(line) for line in (work / v / "metrics.jsonl").read_text().splitlines()] for v in "ABCD"}
val = {v: {m["step"]: m["val_mlm_loss"] for m in rows if "val_mlm_loss" in m} for v, rows in runs.items()}
train = {v: {m["step"]: m["loss"] for m in rows if "loss" in m} for v, rows in runs.items()}
print("| run | val_mlm_loss at " + " | ".join(str(s) for s in sorted(val["A"])) + " | max |train loss - A| |")
for v in "ABCD":
    gap = max(abs(train[v][s] - train["A"][s]) for s in train["A"])
    print(f"| {v} | " + " | ".join(f"{val[v][s]:.4f}" for s in sorted(val["A"])) + f" | {gap:.4f} |")
PY
