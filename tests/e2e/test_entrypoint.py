"""entrypoint.sh driven by env vars, as the container runs it (no Docker needed): checks, launch, exit codes.

The checks and the launch choice run against fake `cpt`/`torchrun`/`nvidia-smi` scripts put first on
PATH (fast); the end-to-end tests run the real `cpt` from this venv on the tiny random base model and
small corpus of conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent

# Variables of the surrounding shell that would change what the entrypoint launches.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

FAKE_CPT = """#!/bin/sh
echo "cpt-argv: $*"
env | grep '^CPT_' | sort
"""
FAKE_TORCHRUN = """#!/bin/sh
echo "torchrun-argv: $*"
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
echo "GPU 0: Fake H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
"""
BROKEN_NVIDIA_SMI = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""

# A small but real training run: a few steps of a 2-layer, 64-wide BERT on 32-token sequences.
TINY_RUN = {
    "CPT_MAX_STEPS": "4",
    "CPT_MAX_SEQ_LENGTH": "32",
    "CPT_MICRO_BATCH_SIZE": "2",
    "CPT_GLOBAL_BATCH_SIZE": "4",
    "CPT_EVAL_INTERVAL": "2",
    "CPT_SAVE_INTERVAL": "2",
    "CPT_WORKERS": "1",
}


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def entrypoint_env(extra_bin: Path | None = None, **variables: str) -> dict[str, str]:
    """The test process's environment without CPT_*/torchrun/PyTorchJob variables, plus `variables`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CPT_", "PET_")) and key not in LAUNCH_VARS}
    path = [str(VENV_BIN), env.get("PATH", "/usr/bin:/bin")]
    if extra_bin is not None:
        path.insert(0, str(extra_bin))
    env["PATH"] = os.pathsep.join(path)
    env.update(variables)
    return env


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """cpt, torchrun and nvidia-smi stand-ins that print what they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "cpt", FAKE_CPT)
    write_script(bin_dir / "torchrun", FAKE_TORCHRUN)
    write_script(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    return bin_dir


@pytest.fixture
def mounts(tmp_path: Path) -> dict[str, str]:
    """A corpus dir, a base model dir with config.json and an output path, as CPT_* variables."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-0.txt").write_text("今天天气很好。\n我们去公园散步吧。\n", encoding="utf-8")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return {"CPT_CORPUS": str(corpus), "CPT_BASE_MODEL": str(base), "CPT_OUTPUT": str(tmp_path / "out")}


# ---- checks: exit 3 with one line naming the variable, before cpt starts ---------------------------


def assert_bad_input(result: subprocess.CompletedProcess, variable: str, *fragments: str) -> None:
    assert result.returncode == 3, result.stderr
    assert "cpt-argv" not in result.stdout, "cpt must not start when a check fails"
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("entrypoint: error: ") and variable in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_corpus_exits_3(fake_bin: Path, mounts: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus"
    result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_CORPUS": str(missing)}))
    assert_bad_input(result, "CPT_CORPUS", str(missing), "does not exist", "mount")


def test_empty_corpus_dir_exits_3(fake_bin: Path, mounts: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "zero.txt").touch()
    result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_CORPUS": str(empty)}))
    assert_bad_input(result, "CPT_CORPUS", str(empty), "no non-empty file")


def test_replay_corpus_is_checked_like_the_corpus(fake_bin: Path, mounts: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-news"
    result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_REPLAY_CORPUS": str(missing)}))
    assert_bad_input(result, "CPT_REPLAY_CORPUS", str(missing), "does not exist")
    result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_REPLAY_CORPUS": mounts["CPT_CORPUS"]}))
    assert result.returncode == 0, result.stderr


def test_corpus_glob_must_match(fake_bin: Path, mounts: dict[str, str]) -> None:
    pattern = mounts["CPT_CORPUS"] + "/*.jsonl"
    result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_CORPUS": pattern}))
    assert_bad_input(result, "CPT_CORPUS", pattern, "matches no file")

    several = f"{mounts['CPT_CORPUS']}/*.txt {mounts['CPT_CORPUS']}"
    result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_CORPUS": several}))
    assert result.returncode == 0, result.stderr
    assert f"CPT_CORPUS={several}\n" in result.stdout


def test_base_model_without_config_exits_3(fake_bin: Path, mounts: dict[str, str]) -> None:
    Path(mounts["CPT_BASE_MODEL"], "config.json").unlink()
    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts))
    assert_bad_input(result, "CPT_BASE_MODEL", "config.json")


def test_unwritable_output_exits_3(fake_bin: Path, mounts: dict[str, str], tmp_path: Path) -> None:
    # Tests may run as root, which chmod does not stop; nothing can be created under a regular file.
    regular_file = tmp_path / "not-a-dir"
    regular_file.write_text("x")
    for output in (regular_file / "out", regular_file):
        result = run_entrypoint(env=entrypoint_env(fake_bin, **{**mounts, "CPT_OUTPUT": str(output)}))
        assert_bad_input(result, "CPT_OUTPUT", str(output), "writable")


def test_too_little_free_space_exits_3(fake_bin: Path, mounts: dict[str, str]) -> None:
    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_MIN_FREE_GB="100000000"))
    assert_bad_input(result, "CPT_OUTPUT", "GB free", "CPT_MIN_FREE_GB")
    assert not any(Path(mounts["CPT_OUTPUT"]).iterdir()), "the write probe must be cleaned up"

    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_MIN_FREE_GB="lots"))
    assert result.returncode == 2 and "CPT_MIN_FREE_GB" in result.stderr


def test_free_space_estimate_scales_with_the_base_model(fake_bin: Path, mounts: dict[str, str]) -> None:
    # A sparse 1 TiB file of weights takes no disk but counts at its size, as real weights would.
    weights = Path(mounts["CPT_BASE_MODEL"], "pytorch_model.bin")
    if shutil.disk_usage(weights.parent).free > 2**40:
        pytest.skip("more than 1 TiB free here")
    try:
        with weights.open("wb") as handle:
            handle.truncate(2**40)
    except OSError as error:
        pytest.skip(f"no sparse 1 TiB file here: {error}")
    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts))
    assert_bad_input(result, "CPT_OUTPUT", "GB free", "3 checkpoints", "CPT_MIN_FREE_GB")

    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_MIN_FREE_GB="0"))
    assert result.returncode == 0, result.stderr


def test_require_gpu_without_gpu_exits_3(fake_bin: Path, mounts: dict[str, str]) -> None:
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has a GPU")
    write_script(fake_bin / "nvidia-smi", BROKEN_NVIDIA_SMI)  # then the entrypoint looks for devices / asks torch
    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_REQUIRE_GPU="1"))
    assert_bad_input(result, "CPT_REQUIRE_GPU", "no GPU")


# ---- launch -----------------------------------------------------------------------------------------


def test_runs_cpt_run_with_args_and_env(fake_bin: Path, mounts: dict[str, str]) -> None:
    result = run_entrypoint("--max-steps", "7", env=entrypoint_env(fake_bin, **mounts, CPT_LR="1e-4"))
    assert result.returncode == 0, result.stderr
    assert "cpt-argv: run --max-steps 7\n" in result.stdout
    assert "CPT_LR=1e-4\n" in result.stdout
    assert f"CPT_OUTPUT={mounts['CPT_OUTPUT']}\n" in result.stdout
    assert "1 GPU(s) visible" in result.stderr and "Fake H200" in result.stderr


def test_defaults_are_the_container_mounts(fake_bin: Path) -> None:
    result = run_entrypoint(env=entrypoint_env(fake_bin))
    if Path("/data/corpus").is_dir():
        pytest.skip("this machine has a /data/corpus")
    assert_bad_input(result, "CPT_CORPUS", "/data/corpus")


def test_pass_through_command_skips_checks(fake_bin: Path) -> None:
    result = run_entrypoint("echo", "hi", env=entrypoint_env(fake_bin, CPT_CORPUS="/nonexistent"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"

    result = run_entrypoint("cpt", "--version", env=entrypoint_env(fake_bin))
    assert "cpt-argv: --version\n" in result.stdout


def trainjob_env(nodes: int, node_rank: int, nproc: str) -> dict[str, str]:
    """What Kubeflow Trainer v2.2's torch plugin sets on a TrainJob `cpt-multi` node (pkg/runtime/framework/
    plugins/torch/torch.go): PET_NPROC_PER_NODE stays "auto" with GPUs in resourcesPerNode unless
    trainer.numProcPerNode is set; the master is node 0 of the JobSet's headless service."""
    return {
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": "cpt-multi-node-0-0.cpt-multi",
        "PET_MASTER_PORT": "29500",
    }


PYTORCHJOB_WORKER_ENV = {  # what the legacy Training Operator (v1.9) sets on worker 0 of 2 nodes x 8
    "MASTER_ADDR": "cpt-multi-master-0",
    "MASTER_PORT": "23456",
    "PET_MASTER_ADDR": "cpt-multi-master-0",
    "PET_MASTER_PORT": "23456",
    "WORLD_SIZE": "16",  # pods x nprocPerNode when nprocPerNode is a number; pods when it is auto or unset
    "RANK": "1",
    "PET_NNODES": "2",
    "PET_NODE_RANK": "1",
    "PET_NPROC_PER_NODE": "8",
    "PYTHONUNBUFFERED": "1",
}
WORKER = "--log-dir LOGS --no-python ENTRYPOINT --torchrun-worker cpt run --seed 1"


def launched(result: subprocess.CompletedProcess) -> str:
    """The first line the fake cpt/torchrun printed, with the per-run log dir and this script's path
    replaced by LOGS and ENTRYPOINT."""
    line = result.stdout.splitlines()[0]
    line = re.sub(r"--log-dir \S+/cpt-torchrun\.\w+/logs ", "--log-dir LOGS ", line)
    return line.replace(str(ENTRYPOINT), "ENTRYPOINT")


@pytest.mark.parametrize(
    ("variables", "launcher"),
    [
        ({}, "cpt-argv: run --seed 1"),
        ({"CPT_NPROC_PER_NODE": "1"}, "cpt-argv: run --seed 1"),
        ({"CPT_NPROC_PER_NODE": "4"}, f"torchrun-argv: --standalone --nnodes 1 --nproc-per-node 4 {WORKER}"),
        ({"CPT_NPROC_PER_NODE": "auto"}, f"torchrun-argv: --standalone --nnodes 1 --nproc-per-node auto {WORKER}"),
        ({"CPT_NPROC_PER_NODE": "gpu"}, f"torchrun-argv: --standalone --nnodes 1 --nproc-per-node gpu {WORKER}"),
        # Trainer v2 TrainJob: one node with its GPUs (a local rendezvous), one node and one process,
        # N nodes with auto or an explicit count, and CPT_NPROC_PER_NODE beating PET_NPROC_PER_NODE.
        (trainjob_env(1, 0, "auto"), f"torchrun-argv: --standalone --nnodes 1 --nproc-per-node auto {WORKER}"),
        (trainjob_env(1, 0, "1"), "cpt-argv: run --seed 1"),
        (
            trainjob_env(4, 2, "auto"),
            "torchrun-argv: --nnodes 4 --nproc-per-node auto --node-rank 2 "
            f"--master-addr cpt-multi-node-0-0.cpt-multi --master-port 29500 {WORKER}",
        ),
        (
            trainjob_env(2, 0, "8"),
            "torchrun-argv: --nnodes 2 --nproc-per-node 8 --node-rank 0 "
            f"--master-addr cpt-multi-node-0-0.cpt-multi --master-port 29500 {WORKER}",
        ),
        (
            {**trainjob_env(2, 1, "auto"), "CPT_NPROC_PER_NODE": "2"},
            "torchrun-argv: --nnodes 2 --nproc-per-node 2 --node-rank 1 "
            f"--master-addr cpt-multi-node-0-0.cpt-multi --master-port 29500 {WORKER}",
        ),
        # Legacy PyTorchJob: PET_NNODES (pods), never WORLD_SIZE (pods x processes there).
        (
            PYTORCHJOB_WORKER_ENV,
            "torchrun-argv: --nnodes 2 --nproc-per-node 8 --node-rank 1 --master-addr cpt-multi-master-0 "
            f"--master-port 23456 {WORKER}",
        ),
        (
            {"MASTER_ADDR": "m", "MASTER_PORT": "29400", "WORLD_SIZE": "3", "RANK": "2"},  # operators before PET_*
            f"torchrun-argv: --nnodes 3 --nproc-per-node 1 --node-rank 2 --master-addr m --master-port 29400 {WORKER}",
        ),
        (
            {"MASTER_ADDR": "cpt-multi-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "1", "RANK": "0",
             "PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "auto"},  # a Master alone
            f"torchrun-argv: --standalone --nnodes 1 --nproc-per-node auto {WORKER}",
        ),
        (
            {"PET_RDZV_ENDPOINT": "cpt-multi-master-0:23456", "PET_NNODES": "1:4", "PET_NPROC_PER_NODE": "8"},
            "torchrun-argv: --nnodes 1:4 --nproc-per-node 8 --rdzv-backend c10d "
            f"--rdzv-endpoint cpt-multi-master-0:23456 --rdzv-id cpt {WORKER}",
        ),
        ({**PYTORCHJOB_WORKER_ENV, "LOCAL_RANK": "3"}, "cpt-argv: run --seed 1"),  # already a torchrun worker
    ],
    ids=[
        "one-process", "nproc-1", "one-node-4", "one-node-auto", "one-node-gpu",
        "trainjob-1-node-auto", "trainjob-1-node-1-process", "trainjob-4-nodes-auto", "trainjob-2-nodes-8",
        "trainjob-cpt-nproc-wins", "pytorchjob", "old-operator", "pytorchjob-master-only", "elastic",
        "torchrun-worker",
    ],
)
def test_launcher_choice(
    fake_bin: Path, mounts: dict[str, str], tmp_path: Path, variables: dict[str, str], launcher: str
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = run_entrypoint("--seed", "1", env=entrypoint_env(fake_bin, **mounts, **variables, TMPDIR=str(scratch)))
    assert result.returncode == 0, result.stderr
    assert launched(result) == launcher
    assert not any(scratch.iterdir()), "the torchrun dir must be removed at the end"


def test_auto_without_a_gpu_is_one_process(fake_bin: Path, mounts: dict[str, str]) -> None:
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has a GPU")
    write_script(fake_bin / "nvidia-smi", BROKEN_NVIDIA_SMI)
    for variables in ({"CPT_NPROC_PER_NODE": "auto"}, trainjob_env(1, 0, "auto")):
        result = run_entrypoint("--seed", "1", env=entrypoint_env(fake_bin, **mounts, **variables))
        assert result.returncode == 0, result.stderr
        assert launched(result) == "cpt-argv: run --seed 1", "torchrun's auto means one process per CPU core"

    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_NPROC_PER_NODE="gpu"))
    assert_bad_input(result, "CPT_NPROC_PER_NODE", "no GPU")


def test_bad_nproc_exits_2(fake_bin: Path, mounts: dict[str, str]) -> None:
    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_NPROC_PER_NODE="two"))
    assert result.returncode == 2 and "CPT_NPROC_PER_NODE" in result.stderr


# ---- exit codes through a real torchrun (2 CPU processes), with a fake cpt per worker ----------------

# Each worker's fake cpt does what FAKE_RANK<LOCAL_RANK> says: exit with that code, `kill` itself with
# SIGKILL, or `wait` for SIGTERM and then exit 4 as cpt does after its checkpoint. It first leaves a
# file in FAKE_DIR so the test knows the worker is running.
FAKE_CPT_WORKER = """#!/bin/sh
touch "$FAKE_DIR/started.$LOCAL_RANK"
eval "action=\\$FAKE_RANK$LOCAL_RANK"
case $action in
    wait) trap 'exit 4' TERM; sleep 600 & wait ;;
    kill) kill -9 $$ ;;
    *) exit "$action" ;;
esac
"""


def torchrun_env(tmp_path: Path, mounts: dict[str, str], **actions: str) -> dict[str, str]:
    bin_dir = tmp_path / "worker-bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "cpt", FAKE_CPT_WORKER)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir(exist_ok=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return entrypoint_env(bin_dir, **mounts, CPT_NPROC_PER_NODE="2", FAKE_DIR=str(fake_dir), TMPDIR=str(scratch), **actions)


@pytest.mark.parametrize(
    ("actions", "code"),
    [
        ({"FAKE_RANK0": "0", "FAKE_RANK1": "0"}, 0),
        ({"FAKE_RANK0": "3", "FAKE_RANK1": "3"}, 3),  # bad input: the cluster must not retry
        ({"FAKE_RANK0": "wait", "FAKE_RANK1": "3"}, 3),  # torchrun stops rank 0; rank 1 failed first
        ({"FAKE_RANK0": "2", "FAKE_RANK1": "wait"}, 2),
        ({"FAKE_RANK0": "0", "FAKE_RANK1": "1"}, 1),
        ({"FAKE_RANK0": "kill", "FAKE_RANK1": "wait"}, 137),  # killed (OOM): 128 + SIGKILL, as a pod reports it
    ],
    ids=["success", "bad-input", "one-rank-bad-input", "usage", "crash", "killed"],
)
def test_torchrun_exits_with_the_first_failed_workers_code(
    mounts: dict[str, str], tmp_path: Path, actions: dict[str, str], code: int
) -> None:
    env = torchrun_env(tmp_path, mounts, **actions)
    result = run_entrypoint(env=env, timeout=120)
    assert result.returncode == code, result.stderr
    assert "--torchrun-worker cpt run" in result.stderr
    assert not any(Path(env["TMPDIR"]).iterdir()), "the torchrun dir must be removed at the end"


def test_sigterm_reaches_torchrun_workers_and_exits_4(mounts: dict[str, str], tmp_path: Path) -> None:
    env = torchrun_env(tmp_path, mounts, FAKE_RANK0="wait", FAKE_RANK1="wait")
    log = tmp_path / "entrypoint.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            started = [Path(env["FAKE_DIR"], f"started.{rank}") for rank in (0, 1)]
            deadline = time.monotonic() + 60
            while not all(path.exists() for path in started):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the workers did not start within 60 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)  # only the entrypoint, as `docker stop` and the kubelet do
            assert process.wait(timeout=60) == 4, log.read_text()
        finally:
            process.kill()
            process.wait()
    assert "received SIGTERM: passing it to torchrun" in log.read_text()


# ---- end to end with the real cpt ------------------------------------------------------------------


@pytest.mark.slow
def test_trains_and_exports(tiny_base: Path, small_corpus: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    env = entrypoint_env(CPT_CORPUS=str(small_corpus), CPT_BASE_MODEL=str(tiny_base), CPT_OUTPUT=str(output), **TINY_RUN)
    result = run_entrypoint(env=env)
    assert result.returncode == 0, result.stderr
    assert (output / "model" / "config.json").is_file()
    assert list((output / "model").glob("*.safetensors")) or list((output / "model").glob("*.bin"))


def sigterm_after_first_checkpoint_then_rerun(env: dict[str, str], output: Path, log: Path, wait_s: float) -> None:
    """Run the entrypoint, SIGTERM it once the first checkpoint exists: exit 4 and no export; then the same
    command again: exit 0 and an exported model."""
    with log.open("w") as log_file:
        # Without torchrun the entrypoint execs cpt, so this pid is cpt's (as PID 1 is in the container).
        process = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + wait_s
            while not list((output / "checkpoints").glob("step-*")):  # polling the files cpt writes
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no checkpoint within {wait_s} s"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 4, log.read_text()
        finally:
            process.kill()
            process.wait()
    assert not (output / "model").exists()
    result = run_entrypoint(env=env)
    assert result.returncode == 0, result.stderr
    assert (output / "model" / "config.json").is_file()


@pytest.mark.slow
def test_sigterm_exits_4_and_rerun_resumes(tiny_base: Path, small_corpus: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    max_steps = 8
    env = entrypoint_env(
        CPT_CORPUS=str(small_corpus),
        CPT_BASE_MODEL=str(tiny_base),
        CPT_OUTPUT=str(output),
        **{**TINY_RUN, "CPT_MAX_STEPS": str(max_steps), "CPT_SAVE_INTERVAL": "2", "CPT_EVAL_INTERVAL": "1000"},
    )
    sigterm_after_first_checkpoint_then_rerun(env, output, tmp_path / "first.log", wait_s=120)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), f"the rerun started over instead of resuming: steps {steps}"
    assert steps[-1] == max_steps


@pytest.mark.slow
def test_real_cpt_under_a_2_process_torchrun_keeps_its_exit_codes(tiny_base: Path, small_corpus: Path, tmp_path: Path) -> None:
    """cpt's own codes through a real torchrun (2 CPU processes, gloo): a bad setting exits 3, SIGTERM
    after a checkpoint exits 4, and the rerun resumes and exports."""
    output = tmp_path / "run"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = entrypoint_env(
        CPT_CORPUS=str(small_corpus),
        CPT_BASE_MODEL=str(tiny_base),
        CPT_OUTPUT=str(output),
        CPT_NPROC_PER_NODE="2",
        TMPDIR=str(scratch),
        # Several validation sequences: with fewer than ranks, evaluation waits forever (reported).
        CPT_VAL_FRACTION="0.1",
        **{**TINY_RUN, "CPT_MAX_STEPS": "8", "CPT_SAVE_INTERVAL": "2", "CPT_EVAL_INTERVAL": "1000"},
    )
    result = run_entrypoint(env={**env, "CPT_LOADER_WORKERS": "-3"})
    assert result.returncode == 3, result.stderr
    assert "first failed worker's exit code is 3" in result.stderr

    sigterm_after_first_checkpoint_then_rerun(env, output, tmp_path / "first.log", wait_s=180)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8, f"the rerun started over instead of resuming: steps {steps}"
    assert not any(scratch.iterdir())


# ---- the env vars: README, the k8s ConfigMap and the CLI list the same ones -------------------------


def entrypoint_only_vars() -> set[str]:
    """CPT_* variables that entrypoint.sh reads but the CLI does not (CPT_REQUIRE_GPU, ...)."""
    from cpt.cli import env_vars

    return set(re.findall(r"\bCPT_[A-Z0-9_]+", ENTRYPOINT.read_text())) - set(env_vars())


def test_readme_configmap_and_cli_list_the_same_env_vars() -> None:
    import yaml

    from cpt.cli import env_vars

    cli = set(env_vars())
    configmap = next(
        document
        for document in yaml.safe_load_all((REPO / "k8s" / "configmap.yaml").read_text())
        if document and document["kind"] == "ConfigMap"
    )
    assert set(configmap["data"]) == cli, "k8s/configmap.yaml and `cpt.cli.env_vars()` differ"

    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing"
    # Backticked variables in table rows: | `--max-steps` | `CPT_MAX_STEPS` | ... |
    table_rows = [line for line in readme.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    documented = set(re.findall(r"`(CPT_[A-Z0-9_]+)`", "\n".join(table_rows)))
    documented.discard("CPT_DEBUG")  # read by the CLI's error handler, documented or not
    expected = cli | entrypoint_only_vars()
    assert documented == expected, (
        f"README table: missing {sorted(expected - documented)}, unknown {sorted(documented - expected)}"
    )


# ---- the image (built elsewhere: no Docker engine here) ---------------------------------------------


def test_dockerfile_copies_only_what_dockerignore_lets_through() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    allowed = {line[1:].strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile, re.MULTILINE)
    sources = [source.rstrip("/") for line in copies for source in line.split()]
    assert sources, "no COPY found"
    for source in sources:
        assert source in allowed, f".dockerignore keeps {source} out of the build context"
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which the repo lacks"
    # Dependencies before source, so a code change does not reinstall torch.
    assert sources.index("requirements.txt") < sources.index("cpt")
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/entrypoint.sh"\]$', dockerfile, re.MULTILINE)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root")), "the image must run as a non-root user"
    assert os.access(ENTRYPOINT, os.X_OK)
