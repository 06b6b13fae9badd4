#!/usr/bin/env bash
# The built image, end to end (`make image-test` runs this after `make image`; needs a Docker daemon and
# .venv): the embedded demo runs inside the container through `make docker-run` (the README's command)
# without a network (--network none) or a GPU, as a non-root user, with the corpus and the base model
# mounted read-only and the output read-write; the exported model is then loaded and checked on the
# host; and a run without the corpus mount must exit 3 with the entrypoint's one-line message.
#   IMAGE=cpt:0.1.0 tools/image_test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

image="${IMAGE:-cpt:$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}"
max_steps=60
work=$(mktemp -d "${TMPDIR:-/tmp}/cpt-image-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
log() { echo "image-test: $*" >&2; }

# A non-root user: the caller's, or the image's own uid when the caller is root (CI).
if [[ $(id -u) -eq 0 ]]; then user=10001:10001; else user="$(id -u):$(id -g)"; fi

# The demo's inputs (as `cpt demo` makes them): the embedded sample corpus and a tiny random base model.
mkdir -p "$work/corpus" "$work/output" "$work/output-missing"
cp cpt/assets/sample_corpus.txt "$work/corpus/"
.venv/bin/cpt init-base --preset tiny "$work/base" >/dev/null
chmod -R a+rX "$work/corpus" "$work/base"
[[ $(id -u) -ne 0 ]] || chown "$user" "$work/output" "$work/output-missing"

log "demo in $image: $max_steps steps, --network none, user $user, inputs read-only"
start=$(date +%s)
make --no-print-directory docker-run IMAGE="$image" CORPUS="$work/corpus" BASE="$work/base" OUT="$work/output" \
    GPUS= DOCKER_USER="$user" DOCKER_RUN_ARGS="--network none" \
    CPT_MAX_STEPS="$max_steps" CPT_MAX_SEQ_LENGTH=128 CPT_MICRO_BATCH_SIZE=16 CPT_GLOBAL_BATCH_SIZE=32 \
    CPT_LR=3e-3 CPT_WARMUP_STEPS=6 CPT_EVAL_INTERVAL=20 CPT_SAVE_INTERVAL=30 CPT_VAL_FRACTION=0.05
log "demo ran in $(($(date +%s) - start)) s"

# The export on the host: a Hugging Face model with the base's keys, trained, written by that user.
TRANSFORMERS_VERBOSITY=error .venv/bin/python - "$work/output" "$work/base" "$user" "$max_steps" <<'EOF'
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer

output, base, user, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model_dir = output / "model"
model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
batch = tokenizer(["今天天气很好。"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size), logits.shape
assert torch.isfinite(logits).all()

exported = load_file(model_dir / "model.safetensors")
original = torch.load(base / "pytorch_model.bin", map_location="cpu", weights_only=True)
assert set(exported) >= set(original) - {"bert.embeddings.position_ids"}, "the export lacks keys of the base"
changed = [name for name in original if name in exported and not torch.equal(original[name], exported[name])]
assert changed, "no weight changed: the model was not trained"

steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
assert steps[-1] == max_steps, steps
uid = int(user.split(":")[0])
assert {path.stat().st_uid for path in output.rglob("*")} == {uid}, "every output file must belong to the container's user"
assert os.access(model_dir / "config.json", os.R_OK)
print(f"image-test: export ok: {len(exported)} tensors, {len(changed)} trained, steps up to {steps[-1]}, owner uid {uid}")
EOF

# The corpus mount forgotten: the entrypoint's check exits 3 before any training.
rc=0
docker run --rm --network none --user "$user" -v "$work/base":/models/base:ro -v "$work/output-missing":/output \
    "$image" 2>"$work/missing.log" || rc=$?
if [[ $rc -ne 3 ]] || ! grep -q "entrypoint: error: CPT_CORPUS" "$work/missing.log"; then
    log "a run without the corpus exited $rc, not 3:"
    cat "$work/missing.log" >&2
    exit 1
fi
log "missing corpus: exit 3: $(tail -n 1 "$work/missing.log")"
log "ok"
