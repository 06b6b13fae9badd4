#!/usr/bin/env bash
# A/B of `cpt tokenize` between two source trees on the CLUE sample: alternating order each round, wall time
# including start-up (the first tree changes every round), and the shards manifest's hash (must be the same for both trees).
#   git worktree add /tmp/before REV
#   bash bench/experiments/tokenize_ab.sh /tmp/before .      # BEFORE AFTER [ROUNDS]
set -euo pipefail
before=$(realpath "$1"); after=$(realpath "$2"); rounds=${3:-4}
python=${PYTHON:-$PWD/.venv/bin/python}
corpus=$(realpath ../shared/data/clue_small_2500.txt)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$python" -m cpt init-base base >/dev/null
"$python" -m cpt prepare --corpus "$corpus" --output prep >/dev/null 2>&1
for round in $(seq 1 "$rounds"); do
  order=("$before" "$after")
  if (( round % 2 == 0 )); then order=("$after" "$before"); fi
  for tree in "${order[@]}"; do
    run="run-$(basename "$tree")"
    rm -rf "$run"
    cp -r prep "$run"
    started=$(date +%s.%N)
    PYTHONPATH=$tree "$python" -m cpt tokenize --output "$run" --base-model base --workers 2 >/dev/null 2>&1
    ended=$(date +%s.%N)
    echo "round $round $tree $(echo "$ended - $started" | bc) s manifest $(sha256sum "$run/shards/manifest.json" | cut -c1-16)"
  done
done
