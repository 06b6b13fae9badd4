#!/usr/bin/env bash
# Container entrypoint: check the mounts, log the GPUs, then exec `cpt run` (or torchrun).
#
#   IMAGE                        cpt run on /data/corpus, /models/base -> /output (every CPT_* applies)
#   IMAGE --max-steps 1000       the same, with extra `cpt run` flags (a flag beats its CPT_* variable)
#   IMAGE cpt eval ...  / bash   any other command runs as given, without the checks
#
# Exit codes are cpt's (cpt/errors.py): a mount or setting that cannot work exits 3 here, before any
# GPU time is spent, with one line that names the variable, the path and the fix. Kubernetes fails the
# Job on 3 instead of retrying (k8s/job.yaml podFailurePolicy).
#
# Variables read here (the CLI reads every CPT_* itself; they pass through unchanged):
#   CPT_CORPUS        corpus files, dirs or globs, space-separated   (default /data/corpus)
#   CPT_BASE_MODEL    Hugging Face base model dir                    (default /models/base)
#   CPT_OUTPUT        run dir; the model lands in $CPT_OUTPUT/model  (default /output)
#   CPT_MIN_FREE_GB   free space CPT_OUTPUT needs; default: checkpoints and export (11 x the base
#                     weights) + 2 x corpus, less what the run already wrote there; 0 skips the check
#   CPT_REQUIRE_GPU   1: exit 3 when no GPU is visible (set in k8s/job.yaml)
#   CPT_NPROC_PER_NODE  processes (GPUs) on this machine; > 1 starts torchrun
# Under a Kubeflow PyTorchJob (MASTER_ADDR, PET_NNODES, PET_NODE_RANK or RANK, ...) torchrun joins
# the other nodes. `exec` hands PID 1 to cpt/torchrun so SIGTERM reaches Python, which checkpoints
# and exits 4 (rerun to resume). torchrun reports a failed or interrupted worker as exit 1.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }
bad_input() {
    echo "entrypoint: error: $*" >&2
    exit 3
}
usage_error() {
    echo "entrypoint: error: $*" >&2
    exit 2
}

if [[ $# -gt 0 && $1 != -* ]]; then
    exec "$@"
fi

export CPT_CORPUS="${CPT_CORPUS:-/data/corpus}"
export CPT_BASE_MODEL="${CPT_BASE_MODEL:-/models/base}"
export CPT_OUTPUT="${CPT_OUTPUT:-/output}"

# --- corpus: every entry exists, is readable and holds some text --------------------------------
read -r -a corpus_entries <<<"$CPT_CORPUS"
[[ ${#corpus_entries[@]} -gt 0 ]] || bad_input "CPT_CORPUS is blank; set it to the corpus files or directory (default /data/corpus)"
corpus_paths=()
for entry in "${corpus_entries[@]}"; do
    if [[ $entry == *[*?[]* ]]; then
        shopt -s nullglob globstar
        # shellcheck disable=SC2206  # the glob is the point: expand the user's pattern
        matches=($entry)
        shopt -u nullglob globstar
        [[ ${#matches[@]} -gt 0 ]] ||
            bad_input "CPT_CORPUS: the pattern $entry matches no file; mount the corpus (docker -v DIR:/data/corpus:ro) or fix the pattern"
        corpus_paths+=("${matches[@]}")
    else
        corpus_paths+=("$entry")
    fi
done
for path in "${corpus_paths[@]}"; do
    if [[ ! -e $path ]]; then
        bad_input "CPT_CORPUS: $path does not exist; mount the corpus there (docker -v DIR:/data/corpus:ro, or the corpus PVC) or set CPT_CORPUS"
    elif [[ ! -r $path ]]; then
        bad_input "CPT_CORPUS: $path is not readable by uid $(id -u); make it world-readable or run as its owner"
    elif [[ -d $path ]]; then
        [[ -x $path ]] || bad_input "CPT_CORPUS: directory $path is not searchable by uid $(id -u); chmod a+rx it"
        [[ -n $(find -L "$path" -type f -size +0 -print -quit 2>/dev/null) ]] ||
            bad_input "CPT_CORPUS: directory $path holds no non-empty file; put the corpus (.txt/.jsonl/.csv/.tsv, optionally .gz) there"
    elif [[ ! -s $path ]]; then
        bad_input "CPT_CORPUS: $path is empty; point CPT_CORPUS at the corpus text"
    fi
done

# --- base model: a readable Hugging Face dir ----------------------------------------------------
if [[ ! -d $CPT_BASE_MODEL ]]; then
    bad_input "CPT_BASE_MODEL: $CPT_BASE_MODEL is not a directory; mount the base model there (docker -v DIR:/models/base:ro, or the base-model PVC) or set CPT_BASE_MODEL"
elif [[ ! -r $CPT_BASE_MODEL || ! -x $CPT_BASE_MODEL ]]; then
    bad_input "CPT_BASE_MODEL: $CPT_BASE_MODEL is not readable by uid $(id -u); chmod -R a+rX it"
elif [[ ! -f $CPT_BASE_MODEL/config.json ]]; then
    bad_input "CPT_BASE_MODEL: $CPT_BASE_MODEL has no config.json; mount a Hugging Face model dir (config.json, vocab.txt, weights)"
elif [[ ! -r $CPT_BASE_MODEL/config.json ]]; then
    bad_input "CPT_BASE_MODEL: $CPT_BASE_MODEL/config.json is not readable by uid $(id -u); chmod -R a+rX the model dir"
fi

# --- output: a writable dir (tested by writing, which also catches read-only mounts) -------------
if ! mkdir -p "$CPT_OUTPUT" 2>/dev/null || [[ ! -d $CPT_OUTPUT ]]; then
    bad_input "CPT_OUTPUT: cannot create directory $CPT_OUTPUT; mount a writable volume there (docker -v DIR:/output) or set CPT_OUTPUT"
fi
probe="$CPT_OUTPUT/.entrypoint-write-test.$$"
if ! { : >"$probe"; } 2>/dev/null; then
    bad_input "CPT_OUTPUT: $CPT_OUTPUT is not writable by uid $(id -u); mount it read-write and chown it to that uid (docker run --user, or fsGroup in Kubernetes)"
fi
rm -f "$probe"

# --- free space: checkpoints, the export and the tokenized corpus -------------------------------
# Like `cpt plan`: each of the (CPT_KEEP_CHECKPOINTS + 1) checkpoints holds the weights and AdamW's
# two moments (3 x weights), the export writes them twice (safetensors + bin), and the prepared
# corpus plus its shards take about twice the corpus. What the run already wrote counts, so a resumed
# run is not refused for its own checkpoints.
kib_of() { du -skLc --apparent-size "$@" 2>/dev/null | awk 'END {print $1 + 0}'; }
weights_kib() {  # one copy of the weights: a model dir often holds both formats
    local safetensors bin
    safetensors=$(kib_of "$1"/*.safetensors)
    bin=$(kib_of "$1"/*.bin)
    echo $((safetensors > bin ? safetensors : bin))
}
min_free_gb="${CPT_MIN_FREE_GB:-}"
if [[ -n $min_free_gb ]]; then
    [[ $min_free_gb =~ ^[0-9]+([.][0-9]+)?$ ]] ||
        usage_error "CPT_MIN_FREE_GB=$min_free_gb is not a number of GB; use e.g. 50, or 0 to skip the check"
    need_kib=$(awk -v gb="$min_free_gb" 'BEGIN {printf "%.0f", gb * 1024 * 1024}')
    why="CPT_MIN_FREE_GB=$min_free_gb"
else
    keep="${CPT_KEEP_CHECKPOINTS:-2}"
    [[ $keep =~ ^[0-9]+$ ]] || keep=2
    base_kib=$(weights_kib "$CPT_BASE_MODEL")
    corpus_kib=$(kib_of "${corpus_paths[@]}")
    written_kib=$(kib_of "$CPT_OUTPUT")
    need_kib=$((((keep + 1) * 3 + 2) * base_kib + 2 * corpus_kib - written_kib))
    why="$((keep + 1)) checkpoints with optimizer state + the export + the tokenized corpus; CPT_MIN_FREE_GB overrides, 0 skips the check"
fi
free_kib=$(df -Pk "$CPT_OUTPUT" | awk 'NR == 2 {print $4}')
if [[ $need_kib -gt 0 && $free_kib -lt $need_kib ]]; then
    bad_input "CPT_OUTPUT: $CPT_OUTPUT has $(awk -v k="$free_kib" 'BEGIN {printf "%.1f", k / 1048576}') GB free but needs $(awk -v k="$need_kib" 'BEGIN {printf "%.1f", k / 1048576}') GB ($why); mount a bigger volume"
fi

# --- GPUs ----------------------------------------------------------------------------------------
if gpu_list=$(nvidia-smi -L 2>/dev/null) && [[ -n $gpu_list ]]; then
    gpu_count=$(grep -c '^GPU ' <<<"$gpu_list" || true)
    log "$gpu_count GPU(s) visible:"
    while IFS= read -r line; do log "  $line"; done <<<"$gpu_list"
elif compgen -G '/dev/nvidia[0-9]*' >/dev/null || [[ -e /dev/dxg ]]; then  # dxg: WSL2
    gpu_count=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n 1 || true)
    [[ $gpu_count =~ ^[0-9]+$ ]] || gpu_count=0
    log "$gpu_count GPU(s) visible to torch (nvidia-smi unavailable)"
else
    gpu_count=0
    log "no GPU visible (no /dev/nvidia* device): training runs on CPU"
fi
if [[ ${CPT_REQUIRE_GPU:-0} == 1 && $gpu_count -eq 0 ]]; then
    bad_input "CPT_REQUIRE_GPU=1 but no GPU is visible; run with docker --gpus all, request nvidia.com/gpu in Kubernetes, or unset CPT_REQUIRE_GPU to train on CPU"
fi

# --- launch: one process, torchrun on this node, or torchrun across a PyTorchJob's nodes ----------
nproc="${CPT_NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-1}}"
[[ $nproc =~ ^([1-9][0-9]*|auto|gpu)$ ]] ||
    usage_error "CPT_NPROC_PER_NODE=$nproc must be a positive number of processes, auto or gpu"
master_addr="${MASTER_ADDR:-${PET_MASTER_ADDR:-}}"

if [[ -n ${LOCAL_RANK:-} ]]; then
    log "already a torchrun worker (LOCAL_RANK=$LOCAL_RANK): cpt run $*"
    exec cpt run "$@"
elif [[ -n ${PET_RDZV_ENDPOINT:-} ]]; then
    # Elastic PyTorchJob (elasticPolicy): nodes meet at a rendezvous endpoint, node ranks are assigned.
    [[ -n ${PET_NNODES:-} ]] || usage_error "PET_RDZV_ENDPOINT is set but PET_NNODES is not; set both (e.g. PET_NNODES=1:4)"
    launch=(torchrun --nnodes "$PET_NNODES"
        --nproc-per-node "$nproc" --rdzv-backend "${PET_RDZV_BACKEND:-c10d}"
        --rdzv-endpoint "$PET_RDZV_ENDPOINT" --rdzv-id "${PET_RDZV_ID:-cpt}")
elif [[ -n $master_addr ]]; then
    # PyTorchJob: the operator sets MASTER_ADDR/PORT, PET_NNODES and PET_NODE_RANK (older operators:
    # WORLD_SIZE = pods and RANK = this pod's index).
    launch=(torchrun --nnodes "${PET_NNODES:-${WORLD_SIZE:-1}}" --nproc-per-node "$nproc"
        --node-rank "${PET_NODE_RANK:-${RANK:-0}}" --master-addr "$master_addr"
        --master-port "${MASTER_PORT:-${PET_MASTER_PORT:-29500}}")
elif [[ $nproc != 1 ]]; then
    launch=(torchrun --standalone --nnodes 1 --nproc-per-node "$nproc")
else
    log "cpt run $*"
    exec cpt run "$@"
fi
log "${launch[*]} --no-python cpt run $*"
exec "${launch[@]}" --no-python cpt run "$@"
