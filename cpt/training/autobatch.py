"""`--micro-batch-size auto`: the largest micro-batch that fits, keeping --global-batch-size.

On CUDA: a bounded search over the divisors of each process's share of the global batch, largest
first, each tried with a real forward and backward pass on full-length sequences while memory
for AdamW's moments (allocated at the first real step) is held back. It runs on the model before
DDP wraps it (an out-of-memory error inside DDP's backward would leave its reducer mid-reduction)
and in train mode (dropout masks and activation checkpointing as in training); then every rank
takes the smallest size any rank found (all_reduce MIN), so they agree. The answer is cached in
RUN_DIR/autobatch.json per everything that changes the memory a step takes: model shape, sequence
length, precision, unpadding, activation checkpointing, compile, number of processes and device.
On CPU there is nothing to fit: the largest divisor up to 16 keeps the matrix multiplies efficient.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cpt.common.files import read_json, sha256_json, write_json_atomic
from cpt.errors import BadInput
from cpt.training.distributed import min_over_ranks

CPU_MAX_MICRO_BATCH = 16
SAFETY_SHARE_OF_MEMORY = 0.08  # left free for fragmentation and the eval batch


def divisors_descending(number: int) -> list[int]:
    return [d for d in range(number, 0, -1) if number % d == 0]


def cpu_micro_batch_size(per_rank: int) -> int:
    return next(d for d in divisors_descending(per_rank) if d <= CPU_MAX_MICRO_BATCH)


def unwrapped_objective(session) -> torch.nn.Module:
    return getattr(session.objective, "module", session.objective)


def cache_key(session, device_name: str) -> str:
    config = session.model.config.to_dict()
    return sha256_json({
        "model": {key: config.get(key) for key in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                   "num_attention_heads", "vocab_size", "model_type")},
        "seq_length": session.seq_length, "precision": session.precision, "device": device_name,
        "gradient_checkpointing": session.config.gradient_checkpointing, "compile": session.config.compile,
        "unpad": bool(unwrapped_objective(session).unpad), "world_size": session.context.world_size,
    })


def probe_step(session, micro_batch_size: int) -> None:
    """One forward + backward of full-length random sequences at this size, as training runs it: the unwrapped
    objective in train mode. Leaves the mode, the random generators and `.grad` as they were."""
    device = session.context.device
    objective = unwrapped_objective(session)
    was_training = objective.training
    objective.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ids = session.spec.random_token_ids
            input_ids = torch.from_numpy(ids[torch.randint(len(ids), (micro_batch_size, session.seq_length)).numpy()])
            input_ids = input_ids.to(device)
            labels = torch.where(torch.rand(input_ids.shape, device=device) < 0.15, input_ids, -100)
            with session.autocast:
                loss_sum, _correct, _count = objective(input_ids, torch.ones_like(input_ids), labels)
            loss_sum.backward()
    finally:
        objective.train(was_training)
        session.optimizer.zero_grad(set_to_none=True)


def fits(session, micro_batch_size: int) -> bool:
    """One real forward + backward at this size with the optimizer's future memory held back."""
    device = session.context.device
    parameters = sum(p.numel() for p in session.model.parameters())
    reserve = None
    try:
        total = torch.cuda.get_device_properties(device).total_memory
        reserve = torch.empty(int(parameters * 4 * 2 + total * SAFETY_SHARE_OF_MEMORY), dtype=torch.uint8,
                              device=device)
        probe_step(session, micro_batch_size)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del reserve
        torch.cuda.empty_cache()


def auto_micro_batch_size(session, per_rank: int, run_dir: Path) -> int:
    device = session.context.device
    if device.type != "cuda":
        return cpu_micro_batch_size(per_rank)
    device_name = torch.cuda.get_device_name(device)
    key = cache_key(session, device_name)
    cache_path = Path(run_dir) / "autobatch.json"
    cache = read_json(cache_path) or {}
    if key in cache and per_rank % cache[key]["largest_fitting"] == 0:
        local = int(cache[key]["largest_fitting"])
    else:
        local = next((candidate for candidate in divisors_descending(per_rank) if fits(session, candidate)), 0)
    # Every rank takes part, cached or not; the smallest of divisors of per_rank is one too.
    agreed = min_over_ranks(local, session.context)
    if agreed < 1:
        raise BadInput(
            f"not even one sequence of {session.seq_length} tokens fits on {device_name}; add "
            "--gradient-checkpointing or lower --max-seq-length"
        )
    if session.context.is_main_process and cache.get(key, {}).get("largest_fitting") != agreed:
        cache[key] = {"largest_fitting": agreed, "device": device_name, "seq_length": session.seq_length,
                      "world_size": session.context.world_size, "unpad": bool(unwrapped_objective(session).unpad)}
        write_json_atomic(cache_path, cache)
    return agreed


__all__ = ["auto_micro_batch_size", "cache_key", "cpu_micro_batch_size", "divisors_descending", "probe_step"]
