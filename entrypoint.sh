#!/usr/bin/env bash
# Container entrypoint: check the mounts, log the GPUs, then exec `cpt run` or run torchrun.
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
#   CPT_NPROC_PER_NODE  processes on this machine: a count, auto or gpu (one per visible GPU; auto is 1
#                     without a GPU); more than 1 starts torchrun. Default: PET_NPROC_PER_NODE, else 1
# Kubeflow Trainer v2 (TrainJob, torch runtime: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
# PET_MASTER_ADDR/PORT) and the legacy PyTorchJob (MASTER_ADDR/PORT, PET_NNODES, PET_NODE_RANK; older
# operators: WORLD_SIZE = pods, RANK = pod index) make torchrun join the other nodes.
# One process: `exec cpt run`, so SIGTERM reaches Python, which checkpoints and exits 4 (rerun to
# resume). Under torchrun this script stays the parent: it forwards SIGTERM/SIGINT to torchrun and exits
# with the code of the worker that failed first, not torchrun's 1. Each worker runs under
# `entrypoint.sh --torchrun-worker cpt run ...`, which writes the worker's exit code into the error file
# torchelastic gives it (TORCHELASTIC_ERROR_FILE); torchrun copies the first failure's file into its
# own TORCHELASTIC_ERROR_FILE (set here), and after a signal this script reads the workers' files.
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

# A torchrun worker: run the command, and when it fails write its exit code into the worker's
# torchelastic error file (the JSON that @record writes; torchrun reads it). torchrun signals the
# worker's whole process group (os.killpg), so cpt gets SIGTERM itself: this shell only has to outlive
# it, and a trap's command (unlike an ignored signal) is not inherited by cpt.
run_torchrun_worker() {
    trap 'true' TERM INT HUP
    local rc=0
    "$@" || rc=$?
    if [[ $rc -ne 0 && -n ${TORCHELASTIC_ERROR_FILE:-} ]]; then
        local meaning
        case $rc in
            2) meaning="usage error: a malformed flag or variable" ;;
            3) meaning="bad input: fix it, retrying will not help" ;;
            4) meaning="interrupted after a checkpoint: rerun to resume" ;;
            *) meaning="see this rank's log above" ;;
        esac
        printf '{"message": {"message": "%s exited with code %d (%s)", "extraInfo": {"timestamp": "%d"}, "errorCode": %d}}\n' \
            "${1##*/}" "$rc" "$meaning" "$(date +%s)" "$rc" >"$TORCHELASTIC_ERROR_FILE"
    fi
    exit "$rc"
}

if [[ ${1:-} == --torchrun-worker ]]; then
    shift
    run_torchrun_worker "$@"
fi
if [[ $# -gt 0 && $1 != -* ]]; then
    exec "$@"
fi

export CPT_CORPUS="${CPT_CORPUS:-/data/corpus}"
export CPT_BASE_MODEL="${CPT_BASE_MODEL:-/models/base}"
export CPT_OUTPUT="${CPT_OUTPUT:-/output}"

# --- corpus (and replay corpus): every entry exists, is readable and holds some text ------------
# check_corpus VAR: the space-separated files, dirs or globs in $VAR; adds them to corpus_paths (for the
# disk estimate below).
corpus_paths=()
check_corpus() {
    local var=$1 entry path matches corpus_entries paths=()
    read -r -a corpus_entries <<<"${!var}"
    [[ ${#corpus_entries[@]} -gt 0 ]] || bad_input "$var is blank; set it to the corpus files or directory (default /data/corpus)"
    for entry in "${corpus_entries[@]}"; do
        if [[ $entry == *[*?[]* ]]; then
            shopt -s nullglob globstar
            # shellcheck disable=SC2206  # the glob is the point: expand the user's pattern
            matches=($entry)
            shopt -u nullglob globstar
            [[ ${#matches[@]} -gt 0 ]] ||
                bad_input "$var: the pattern $entry matches no file; mount the corpus (docker -v DIR:/data/corpus:ro) or fix the pattern"
            paths+=("${matches[@]}")
        else
            paths+=("$entry")
        fi
    done
    for path in "${paths[@]}"; do
        if [[ ! -e $path ]]; then
            bad_input "$var: $path does not exist; mount the corpus there (docker -v DIR:/data/corpus:ro, or the corpus PVC) or set $var"
        elif [[ ! -r $path ]]; then
            bad_input "$var: $path is not readable by uid $(id -u); make it world-readable or run as its owner"
        elif [[ -d $path ]]; then
            [[ -x $path ]] || bad_input "$var: directory $path is not searchable by uid $(id -u); chmod a+rx it"
            [[ -n $(find -L "$path" -type f -size +0 -print -quit 2>/dev/null) ]] ||
                bad_input "$var: directory $path holds no non-empty file; put the corpus (.txt/.jsonl/.csv/.tsv, optionally .gz) there"
        elif [[ ! -s $path ]]; then
            bad_input "$var: $path is empty; point $var at the corpus text"
        fi
    done
    corpus_paths+=("${paths[@]}")
}
check_corpus CPT_CORPUS
if [[ -n ${CPT_REPLAY_CORPUS:-} ]]; then
    check_corpus CPT_REPLAY_CORPUS
fi

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
probe="$CPT_OUTPUT/.entrypoint-write-test.${HOSTNAME:-host}.$$"  # pods of several nodes share /output
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

# --- launch: one process, torchrun on this node, or torchrun across the nodes of a TrainJob/PyTorchJob --
nproc="${CPT_NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-1}}"
[[ $nproc =~ ^([1-9][0-9]*|auto|gpu)$ ]] ||
    usage_error "CPT_NPROC_PER_NODE=$nproc must be a positive number of processes, auto or gpu"
if [[ $nproc == gpu && $gpu_count -eq 0 ]]; then
    bad_input "CPT_NPROC_PER_NODE=gpu but no GPU is visible; run with docker --gpus all or request nvidia.com/gpu, or set a number of processes"
elif [[ $nproc == auto && $gpu_count -eq 0 ]]; then
    nproc=1  # torchrun's auto would start one process per CPU core; cpt trains on CPU in one process
fi
master_addr="${MASTER_ADDR:-${PET_MASTER_ADDR:-}}"
nnodes="${PET_NNODES:-${WORLD_SIZE:-1}}"  # legacy operators without PET_NNODES: WORLD_SIZE = pods

if [[ -n ${LOCAL_RANK:-} ]]; then
    log "already a torchrun worker (LOCAL_RANK=$LOCAL_RANK): cpt run $*"
    run_torchrun_worker cpt run "$@"
elif [[ -n ${PET_RDZV_ENDPOINT:-} ]]; then
    # Elastic PyTorchJob (elasticPolicy): nodes meet at a rendezvous endpoint, node ranks are assigned.
    [[ -n ${PET_NNODES:-} ]] || usage_error "PET_RDZV_ENDPOINT is set but PET_NNODES is not; set both (e.g. PET_NNODES=1:4)"
    launch=(torchrun --nnodes "$PET_NNODES"
        --nproc-per-node "$nproc" --rdzv-backend "${PET_RDZV_BACKEND:-c10d}"
        --rdzv-endpoint "$PET_RDZV_ENDPOINT" --rdzv-id "${PET_RDZV_ID:-cpt}")
elif [[ -n $master_addr && $nnodes != 1 ]]; then
    # TrainJob: PET_NODE_RANK is the pod's completion index; PyTorchJob: PET_NODE_RANK, or RANK on
    # operators that predate it.
    launch=(torchrun --nnodes "$nnodes" --nproc-per-node "$nproc"
        --node-rank "${PET_NODE_RANK:-${RANK:-0}}" --master-addr "$master_addr"
        --master-port "${MASTER_PORT:-${PET_MASTER_PORT:-29500}}")
elif [[ $nproc != 1 ]]; then
    # One node (also a one-node TrainJob or PyTorchJob): a local rendezvous on a free port.
    launch=(torchrun --standalone --nnodes 1 --nproc-per-node "$nproc")
else
    log "cpt run $*"
    exec cpt run "$@"
fi

# torchrun runs as a child in its own process group (set -m), so a signal for this shell reaches it
# once, forwarded here; it passes the signal to the workers and waits PET_SHUTDOWN_TIMEOUT seconds
# (default 30) for their checkpoints.
torchrun_dir=$(mktemp -d "${TMPDIR:-/tmp}/cpt-torchrun.XXXXXX")
export TORCHELASTIC_ERROR_FILE="$torchrun_dir/error.json"
launch+=(--log-dir "$torchrun_dir/logs" --no-python "${BASH_SOURCE[0]}" --torchrun-worker cpt run "$@")
log "${launch[*]}"
set -m
"${launch[@]}" &
torchrun_pid=$!
set +m
# shellcheck disable=SC2329  # called by the traps below
forward() {
    signalled=1
    log "received SIG$1: passing it to torchrun (pid $torchrun_pid)"
    kill -s "$1" "$torchrun_pid" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
while :; do
    signalled=0
    torchrun_rc=0
    wait "$torchrun_pid" || torchrun_rc=$?
    [[ $signalled -eq 1 ]] || break # a trap makes wait return early; wait again for the real status
done

# The exit code of the worker that failed first: torchrun's own error file carries it as errorCode
# after a worker failure; after a signal it holds torchrun's record instead, so the workers' files
# (earliest first) decide. torchrun's own code when neither has one.
exit_code=$torchrun_rc
if [[ $torchrun_rc -ne 0 ]]; then
    worker_code=$(
        python - "$TORCHELASTIC_ERROR_FILE" "$torchrun_dir"/logs/*/attempt_*/*/error.json <<'EOF' || true
import json
import sys


def failure(path):
    """(timestamp, exit code) from a torchelastic error file, or None."""
    try:
        with open(path, encoding="utf-8") as handle:
            message = json.load(handle)["message"]
        return int(message["extraInfo"]["timestamp"]), int(message["errorCode"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


launcher = failure(sys.argv[1])
workers = sorted(filter(None, map(failure, sys.argv[2:])))
first = launcher or (workers[0] if workers else None)
if first:
    print(first[1])
EOF
    )
    if [[ $worker_code =~ ^[0-9]+$ ]]; then
        exit_code=$worker_code
        log "torchrun exited with $torchrun_rc; the first failed worker's exit code is $exit_code"
    fi
fi
rm -rf "$torchrun_dir"
exit "$exit_code"
