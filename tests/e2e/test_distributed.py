"""DDP under torchrun: 2 CPU processes (gloo) end with the same weights as 1 process."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import assert_two_processes_match_one, prepare_and_tokenize, torchrun_cpt

from cpt.common.runtime import leave_process
from cpt.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_two_processes_agree_with_one(tmp_path, tiny_base, small_corpus):
    config = json.loads((tiny_base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout draws differ per rank
    (tiny_base / "config.json").write_text(json.dumps(config))
    single = tmp_path / "single"
    prepare_and_tokenize(single, small_corpus, tiny_base)
    double = tmp_path / "double"
    shutil.copytree(single, double)
    flags = ["--base-model", str(tiny_base), "--micro-batch-size", "4", "--global-batch-size", "8",
             "--max-steps", "4", "--lr", "1e-3", "--warmup-steps", "0", "--eval-interval", "2", "--save-interval", "4",
             "--eval-max-sequences", "8", "--device", "cpu", "--precision", "fp32", "--head-warmup", "2"]
    # --head-warmup 2: the head phase (its gradients all-reduced by hand, outside DDP) and then the whole model.
    # fp32: the ranks' micro-batches are dealt by tokens, so they differ from the single process's (other padded
    # widths); the sum over the global batch is the same, but bf16 rounding would differ beyond the tolerance.
    assert_two_processes_match_one(single, double, flags, step=4)
    single_metrics = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    double_metrics = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in single_metrics] == [m["step"] for m in double_metrics], "only rank 0 writes metrics"
    assert single_metrics[-1]["val_mlm_loss"] == pytest.approx(double_metrics[-1]["val_mlm_loss"], rel=1e-4)
    assert single_metrics[-1]["tokens_seen"] == double_metrics[-1]["tokens_seen"]
    phases = [(m["step"], m.get("phase")) for m in double_metrics]
    assert [p for p in phases if p[1] == "head"] == [(s, "head") for s, _ in phases if s in (1, 2)][:2], phases
    assert phases == [(m["step"], m.get("phase")) for m in single_metrics] and phases[-1][1] == "full"


def test_fewer_val_sequences_than_ranks_does_not_hang(tmp_path, tiny_base, small_corpus):
    """Evaluation with 1 val sequence on 2 ranks: rank 1 has none. Through DDP, rank 0's forward was a
    collective that rank 1 never joined, and the step-0 evaluation waited forever."""
    run_dir = tmp_path / "run"
    prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    result = torchrun_cpt(["train", "--output", str(run_dir), "--base-model", str(tiny_base), "--micro-batch-size", "4",
                           "--global-batch-size", "8", "--max-steps", "2", "--eval-interval", "2", "--save-interval",
                           "2", "--eval-max-sequences", "1", "--device", "cpu"], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["val_masked_tokens"] > 0 and metrics[-1]["step"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the micro-batch search runs there)")
def test_auto_micro_batch_under_torchrun_on_one_gpu(tmp_path, tiny_base, small_corpus):
    """`--micro-batch-size auto` under torchrun (1 process, NCCL): the search runs before DDP wraps the model,
    the ranks agree, training finishes and the cache records the world size."""
    run_dir = tmp_path / "run"
    prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    result = torchrun_cpt(["train", "--output", str(run_dir), "--base-model", str(tiny_base), "--micro-batch-size",
                           "auto", "--global-batch-size", "16", "--max-steps", "3", "--eval-interval", "3",
                           "--save-interval", "3", "--eval-max-sequences", "8", "--device", "cuda"], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--micro-batch-size auto -> 16" in result.stderr, result.stderr[-3000:]
    (entry,) = json.loads((run_dir / "autobatch.json").read_text()).values()
    assert entry["largest_fitting"] == 16 and entry["world_size"] == 1
    assert ckpt.is_valid_checkpoint(ckpt.step_dir(run_dir, 3))


def _rank_flags(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from cpt.training.distributed import DistContext, broadcast_flag, broadcast_flags, min_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        context = DistContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
        merged = broadcast_flags((rank == 1, False, True), context)  # rank 1 alone raises the first flag
        single = broadcast_flag(rank == 0, context)
        smallest = min_over_ranks(8 if rank == 0 else 4, context)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
            json.dump({"merged": merged, "single": single, "min": smallest}, out)
    finally:
        dist.destroy_process_group()
    leave_process(0)  # skip interpreter shutdown: its gloo teardown aborted a finished worker once in CI


def test_flags_and_minimum_agree_across_ranks(tmp_path):
    """One all-reduce answers several flags (any rank's True wins each) and the ranks' minimum (gloo, 2 processes)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_flags, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"merged": [True, False, True], "single": True, "min": 4}, (rank, got)
