"""Shared fixtures: tiny random BERT base models and small corpora, built locally (no hub)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

# Tiny models on a shared 2-core box: one thread per process avoids OpenMP threads waiting on each other
# (set before torch is imported by any test module; subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_CORPUS = REPO / "cpt" / "assets" / "sample_corpus.txt"


def cpt_command() -> list[str]:
    """How tests start the real CLI in a subprocess."""
    return [sys.executable, "-m", "cpt"]


def run_main(args: list[str], env: dict[str, str], monkeypatch, capsys) -> tuple[int, str]:
    """`cpt ARGS` in-process through cli.main(), which is what `python -m cpt` runs (exit code, stderr)."""
    from cpt.cli import main

    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setattr(sys, "argv", ["cpt", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
    return exited.value.code, capsys.readouterr().err


def torchrun_cpt(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m cpt ARGS` on loopback (a free port), one intra-op thread per process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "cpt", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout,
    )


def assert_two_processes_match_one(single: Path, double: Path, flags: list[str], step: int) -> None:
    """`cpt train FLAGS` in one process (run dir `single`) and under 2 gloo processes (`double`, a copy of
    it) end at `step` with the same weights."""
    import torch

    from cpt.common.weights import read_state_dict
    from cpt.training import checkpoint as ckpt

    subprocess.run([sys.executable, "-m", "cpt", "train", "--output", str(single), *flags], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    result = torchrun_cpt(["train", "--output", str(double), *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    want = read_state_dict(ckpt.step_dir(single, step) / "model.safetensors")
    got = read_state_dict(ckpt.step_dir(double, step) / "model.safetensors")
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-5, rtol=1e-4), name


@pytest.fixture(scope="session")
def tiny_base_template(tmp_path_factory) -> Path:
    from cpt.training.model import init_base

    path = tmp_path_factory.mktemp("base") / "tiny"
    init_base(path, preset="tiny", seed=0, max_position_embeddings=128)
    return path


@pytest.fixture
def tiny_base(tiny_base_template, tmp_path) -> Path:
    """A fresh copy of a 2-layer / 64-hidden BERT dir (config.json, vocab.txt, pytorch_model.bin)."""
    path = tmp_path / "base-model"
    shutil.copytree(tiny_base_template, path)
    return path


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """~60 news documents from the embedded sample, one per line."""
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:60]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("CPT_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def prepare_and_tokenize(run_dir: Path, corpus: Path, base: Path, *, val_fraction: float = 0.1) -> Path:
    """`cpt prepare` + `cpt tokenize` in-process into `run_dir` (64-token sequences, one worker): where the
    in-process training tests start."""
    from cpt.config import PrepareConfig, TokenizeConfig
    from cpt.data.prepare import prepare_corpus
    from cpt.data.tokenization import tokenize_corpus

    prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(corpus),), val_fraction=val_fraction))
    tokenize_corpus(TokenizeConfig(output=run_dir, base_model=base, max_seq_length=64, workers=1))
    return run_dir


def ragged_lm_batch(seed: int = 1, lengths=(1, 20, 31, 32, 50, 64), device="cpu",
                    mask_share: float = 0.3) -> dict[str, torch.Tensor]:
    """An MLM batch of sequences of the given lengths, padded to the longest: random ids, about `mask_share`
    of the real tokens as targets (the rest -100)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1000, 5000, (len(lengths), width), generator=generator)
    attention_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    input_ids[attention_mask == 0] = 0
    labels = torch.where((torch.rand(input_ids.shape, generator=generator) < mask_share) & (attention_mask == 1),
                         input_ids, -100)
    return {key: value.to(device) for key, value in
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items()}


# --- training helpers shared by test_train and test_replay ---------------------------------------------

def final_weights(run_dir: Path, step: int) -> dict:
    """The weights of checkpoint step-`step` in `run_dir`."""
    from cpt.common.weights import read_state_dict
    from cpt.training import checkpoint as ckpt

    return read_state_dict(ckpt.step_dir(run_dir, step) / "model.safetensors")


def stop_after(monkeypatch, steps: int) -> None:
    """Make the loop see a SIGTERM after `steps` optimizer steps (deterministic stand-in for a signal)."""
    from cpt.training.monitor import StopSignal

    class StopAfter(StopSignal):
        checks = 0

        @property
        def requested(self):
            StopAfter.checks += 1
            return StopAfter.checks >= steps

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr("cpt.training.loop.StopSignal", StopAfter)


def assert_resume_is_bit_identical(run_dir: Path, other: Path, config_for, monkeypatch, last_step: int) -> None:
    """`other` (a copy of `run_dir`) interrupted after 3 steps (a checkpoint there) and rerun ends with the same
    weights at `last_step` as an uninterrupted run in `run_dir`. config_for(dir) -> TrainConfig."""
    import torch

    from cpt.errors import Interrupted
    from cpt.training import checkpoint as ckpt
    from cpt.training.loop import train

    shutil.copytree(run_dir, other)
    train(config_for(run_dir))
    with monkeypatch.context() as patch:
        stop_after(patch, 3)
        with pytest.raises(Interrupted):
            train(config_for(other))
    assert ckpt.latest_valid_checkpoint(other) == ckpt.step_dir(other, 3)
    train(config_for(other))
    want, got = final_weights(run_dir, last_step), final_weights(other, last_step)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
