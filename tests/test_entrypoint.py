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

REPO = Path(__file__).resolve().parents[1]
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


PYTORCHJOB_WORKER_ENV = {  # what the Kubeflow training operator (v1.9) sets on worker 0 of 2 nodes
    "MASTER_ADDR": "cpt-multi-master-0",
    "MASTER_PORT": "23456",
    "PET_MASTER_ADDR": "cpt-multi-master-0",
    "PET_MASTER_PORT": "23456",
    "WORLD_SIZE": "16",
    "RANK": "1",
    "PET_NNODES": "2",
    "PET_NODE_RANK": "1",
    "PET_NPROC_PER_NODE": "8",
    "PYTHONUNBUFFERED": "1",
}


@pytest.mark.parametrize(
    ("variables", "launcher"),
    [
        ({}, "cpt-argv: run --seed 1"),
        ({"CPT_NPROC_PER_NODE": "1"}, "cpt-argv: run --seed 1"),
        ({"CPT_NPROC_PER_NODE": "4"}, "torchrun-argv: --standalone --nnodes 1 --nproc-per-node 4 --no-python cpt run --seed 1"),
        (
            PYTORCHJOB_WORKER_ENV,
            "torchrun-argv: --nnodes 2 --nproc-per-node 8 --node-rank 1 --master-addr cpt-multi-master-0 "
            "--master-port 23456 --no-python cpt run --seed 1",
        ),
        (
            {"MASTER_ADDR": "m", "MASTER_PORT": "29400", "WORLD_SIZE": "3", "RANK": "2"},  # older operators
            "torchrun-argv: --nnodes 3 --nproc-per-node 1 --node-rank 2 --master-addr m --master-port 29400 "
            "--no-python cpt run --seed 1",
        ),
        (
            {"PET_RDZV_ENDPOINT": "cpt-multi-master-0:23456", "PET_NNODES": "1:4", "PET_NPROC_PER_NODE": "8"},
            "torchrun-argv: --nnodes 1:4 --nproc-per-node 8 --rdzv-backend c10d "
            "--rdzv-endpoint cpt-multi-master-0:23456 --rdzv-id cpt --no-python cpt run --seed 1",
        ),
        ({**PYTORCHJOB_WORKER_ENV, "LOCAL_RANK": "3"}, "cpt-argv: run --seed 1"),  # already a torchrun worker
    ],
    ids=["one-process", "nproc-1", "one-node", "pytorchjob", "old-operator", "elastic", "torchrun-worker"],
)
def test_launcher_choice(fake_bin: Path, mounts: dict[str, str], variables: dict[str, str], launcher: str) -> None:
    result = run_entrypoint("--seed", "1", env=entrypoint_env(fake_bin, **mounts, **variables))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == launcher


def test_bad_nproc_exits_2(fake_bin: Path, mounts: dict[str, str]) -> None:
    result = run_entrypoint(env=entrypoint_env(fake_bin, **mounts, CPT_NPROC_PER_NODE="two"))
    assert result.returncode == 2 and "CPT_NPROC_PER_NODE" in result.stderr


# ---- end to end with the real cpt ------------------------------------------------------------------


@pytest.mark.slow
def test_trains_and_exports(tiny_base: Path, small_corpus: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    env = entrypoint_env(CPT_CORPUS=str(small_corpus), CPT_BASE_MODEL=str(tiny_base), CPT_OUTPUT=str(output), **TINY_RUN)
    result = run_entrypoint(env=env)
    assert result.returncode == 0, result.stderr
    assert (output / "model" / "config.json").is_file()
    assert list((output / "model").glob("*.safetensors")) or list((output / "model").glob("*.bin"))


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
    log = tmp_path / "first.log"
    with log.open("w") as log_file:
        # The entrypoint execs cpt, so this pid is cpt's (as PID 1 is in the container).
        process = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not list((output / "checkpoints").glob("step-*")):
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
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
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), f"the rerun started over instead of resuming: steps {steps}"
    assert steps[-1] == max_steps


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
