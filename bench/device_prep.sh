#!/usr/bin/env bash
# Prepare the one GPU run (issue 7's GPU half) for a lent device machine: it has PyTorch (2.11, cu130),
# Python 3.12 and no package registry. Fills .devcarry/ (git-ignored through .git/info/exclude) with
# the wheels cpt needs beyond that image, the HF Trainer reference and the CLUE corpus, and prints
# the command to give the device tool's `run` (carry: [".devcarry"]). About 30 MB.
#   bash bench/device_prep.sh [SHARED_DIR]      # SHARED_DIR: ../shared by default
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${1:-$repo/../shared}
carry=$repo/.devcarry
grep -qx '/.devcarry/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.devcarry/' >> "$repo/.git/info/exclude"
rm -rf "$carry" && mkdir -p "$carry/whl"
pin() { grep -E "^$1==" "$repo/requirements.txt" | head -n 1; }
pin_dev() { grep -E "^$1==" "$repo/requirements-dev.txt" | head -n 1; }
# transformers 5.23 needs pydantic (not in the device image); the pins are those of this repo's venv
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$carry/whl" "$(pin transformers)" "$(pin tokenizers)" "$(pin rjieba)" "$(pin typer)" "$(pin rich)" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  annotated-doc==0.0.7 \
  "$(pin_dev pytest)" pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0   # gpu_bench runs the CUDA tests
cp "$shared/bench/hf_trainer_mlm.py" "$carry/"
cp "$shared/data/clue_small_2500.txt" "$carry/"
du -sh "$carry"
cat <<'CMD'
device run (timeout_s 600, carry [".devcarry"]):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcarry/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CPT_BENCH_CORPUS=$PWD/.devcarry/clue_small_2500.txt || exit; nvidia-smi --query-gpu=name,memory.total --format=csv; timeout 570 python3 bench/gpu_bench.py --out $OUT/gpu.json --work /tmp/gpu-work --hf-trainer .devcarry/hf_trainer_mlm.py 2>&1 | tee $OUT/log.txt
CMD
