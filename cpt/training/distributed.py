"""torchrun / DDP plumbing; a no-op on one device.

Under torchrun (WORLD_SIZE > 1) each process joins the group (NCCL on CUDA, gloo on CPU), takes
its device from LOCAL_RANK and its share of each global batch by RANK. Rank 0 writes files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpt.common import runtime
from cpt.errors import BadInput


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is visible; run with --gpus / a GPU node, or --device cpu")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str) -> DistContext:
    """This process's place in the job (torchrun's variables, via cpt.common.runtime) and device; joins the
    process group when there are several."""
    world_size, rank, local_rank = runtime.world_size(), runtime.rank(), runtime.local_rank()
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def min_over_ranks(value: int, context: DistContext) -> int:
    """The smallest of every rank's `value` (e.g. the largest micro-batch each fits); `value` on one process."""
    if not context.is_distributed:
        return value
    # NCCL reduces device tensors only; gloo (CPU groups) host tensors.
    device = context.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def barrier(context: DistContext) -> None:
    if context.is_distributed:
        dist.barrier()


def broadcast_flag(value: bool, context: DistContext) -> bool:
    """True on every rank when any rank says True (e.g. a signal arrived on one of them)."""
    return broadcast_flags((value,), context)[0]


def broadcast_flags(values: tuple[bool, ...], context: DistContext) -> tuple[bool, ...]:
    """Each flag True on every rank when any rank says it: one all-reduce for all of them. Reading the result
    waits for the device (NCCL queues it behind the step), so a step's flags (stop signal, --max-time) are
    best asked together, once."""
    if not context.is_distributed:
        return tuple(values)
    flags = torch.tensor([1.0 if value else 0.0 for value in values], device=context.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return tuple(bool(flag > 0) for flag in flags.tolist())


def teardown(context: DistContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
