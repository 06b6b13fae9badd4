"""`--micro-batch-size auto` (cpt/training/autobatch.py) with the CUDA facts mocked: the search, its cache key, the probe
(unwrapped model, train mode, nothing left behind) and the agreement of ranks (2 gloo processes)."""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from cpt.common.files import read_json
from cpt.common.runtime import leave_process
from cpt.training import autobatch
from cpt.training.distributed import DistContext


class FakeObjective(torch.nn.Module):
    """Records the mode it was called in; a loss that reaches its one weight."""

    def __init__(self, unpad: bool = True):
        super().__init__()
        self.unpad = unpad
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, tuple[int, ...]]] = []

    def forward(self, input_ids, attention_mask, labels):
        self.calls.append((self.training, tuple(input_ids.shape)))
        loss = self.weight * (labels != -100).sum()
        return loss, torch.zeros(()), torch.zeros(())


def fake_session(*, device="cuda", rank=0, world_size=1, unpad=True, precision="bf16", seq_length=128,
                 gradient_checkpointing=False, compile=False):
    objective = FakeObjective(unpad)
    model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"hidden_size": 64, "num_hidden_layers": 2,
                                                                    "model_type": "bert"}),
                            parameters=objective.parameters)
    return SimpleNamespace(
        context=DistContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device(device, rank)
                            if device == "cuda" else torch.device(device)),
        model=model, objective=objective, optimizer=torch.optim.SGD(objective.parameters(), lr=0.1),
        autocast=contextlib.nullcontext(), precision=precision, seq_length=seq_length,
        spec=SimpleNamespace(random_token_ids=torch.arange(100, 200).numpy()),
        config=SimpleNamespace(gradient_checkpointing=gradient_checkpointing, compile=compile),
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda's name and a `fits` that says yes up to `largest` sequences; records what was tried."""
    state = {"largest": 6, "tried": []}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")

    def fits(session, micro_batch_size):
        state["tried"].append(micro_batch_size)
        return micro_batch_size <= state["largest"]

    monkeypatch.setattr(autobatch, "fits", fits)
    return state


def test_search_takes_the_largest_divisor_that_fits_and_caches_it(tmp_path, fake_gpu):
    session = fake_session()
    assert autobatch.auto_micro_batch_size(session, 16, tmp_path) == 4
    assert fake_gpu["tried"] == [16, 8, 4]
    (entry,) = read_json(tmp_path / "autobatch.json").values()
    assert entry["largest_fitting"] == 4 and entry["world_size"] == 1 and entry["unpad"] is True
    fake_gpu["tried"].clear()
    assert autobatch.auto_micro_batch_size(session, 16, tmp_path) == 4 and fake_gpu["tried"] == [], "from the cache"


def test_nothing_fits_is_a_clear_error(tmp_path, fake_gpu):
    from cpt.errors import BadInput

    fake_gpu["largest"] = 0
    with pytest.raises(BadInput, match="not even one sequence of 128 tokens fits on NVIDIA H100"):
        autobatch.auto_micro_batch_size(fake_session(), 8, tmp_path)


def test_cache_key_changes_with_everything_that_changes_memory():
    base = dict(device="cuda")
    keys = {autobatch.cache_key(fake_session(**base, **change), "H100") for change in (
        {}, {"unpad": False}, {"precision": "fp16"}, {"gradient_checkpointing": True}, {"world_size": 2},
        {"seq_length": 512}, {"compile": True})}
    assert len(keys) == 7
    assert autobatch.cache_key(fake_session(), "H100") != autobatch.cache_key(fake_session(), "H200")


def test_probe_runs_in_train_mode_and_leaves_nothing_behind():
    session = fake_session(device="cpu")
    objective = session.objective.eval()
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    autobatch.probe_step(session, 4)
    assert objective.calls == [(True, (4, 128))], "train mode: dropout and checkpointing as in training"
    assert not objective.training, "the mode it had"
    assert torch.equal(torch.get_rng_state(), rng) and objective.weight.grad is None


def test_probe_unwraps_a_wrapped_objective():
    session = fake_session(device="cpu")
    inner = session.objective
    session.objective = SimpleNamespace(module=inner)  # what DDP looks like from outside
    autobatch.probe_step(session, 2)
    assert inner.calls == [(True, (2, 128))]


def _rank_search(rank: int, world_size: int, init_file: str, run_dir: str, largest_per_rank: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.cuda.get_device_name = lambda device=None: "NVIDIA H100 80GB HBM3"
        autobatch.fits = lambda session, size: size <= largest_per_rank[rank]
        chosen = autobatch.auto_micro_batch_size(fake_session(rank=rank, world_size=world_size), 16, run_dir)
        with open(os.path.join(run_dir, f"rank{rank}.txt"), "w") as out:
            out.write(str(chosen))
    finally:
        dist.destroy_process_group()
    leave_process(0)  # skip interpreter shutdown: its gloo teardown aborted a finished worker once in CI


@pytest.mark.slow
def test_ranks_agree_on_the_smallest_size_any_of_them_fits(tmp_path):
    """Rank 0 fits 8, rank 1 only 4 (a fuller GPU): both train with 4, and the cache says 4."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_search, args=(2, str(tmp_path / "init"), str(tmp_path), [8, 4]), nprocs=2, join=True)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["4", "4"]
    (entry,) = read_json(tmp_path / "autobatch.json").values()
    assert entry["largest_fitting"] == 4 and entry["world_size"] == 2


def test_cpu_takes_the_largest_divisor_up_to_16():
    assert autobatch.auto_micro_batch_size(fake_session(device="cpu"), 48, "/nonexistent") == 16
