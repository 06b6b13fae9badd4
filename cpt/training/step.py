"""One optimizer step: the phase it belongs to, its learning rate, forward/backward over the micro-batches of
one global batch, and its sums read back without stalling the device.

    phase = enter_phase(session, state)                       # head warm-up or the whole model
    sums, next_sampler = train_step(session, state, prepared, phase)
    sums.values()                                             # {lr, loss_sum, correct, masked, tokens}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel

from cpt.config import TrainConfig
from cpt.training.batches import SamplerState
from cpt.training.checkpoint import TrainState
from cpt.training.distributed import DistContext, all_reduce_sum
from cpt.training.head_warmup import freeze_all_but_head, head_parameters
from cpt.training.model import IGNORE_INDEX, MaskedLMObjective, parameter_groups
from cpt.training.schedule import learning_rate_at

if TYPE_CHECKING:
    from cpt.training.session import Session


@dataclass
class Phase:
    """What a step trains: the whole model (full) or, during the head warm-up, the MLM head alone."""

    name: str  # "head" or "full"
    objective: torch.nn.Module  # the head phase bypasses DDP: its few gradients are all-reduced by hand
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]

    @property
    def uses_ddp(self) -> bool:
        return isinstance(self.objective, DistributedDataParallel)


def enter_phase(session: Session, state: TrainState) -> Phase:
    """The phase of the step at `state`, with the model's trainable parameters set for it."""
    head_only = state.phase == "head"
    freeze_all_but_head(session.model, head_only)
    if not head_only:
        return Phase("full", session.objective, session.optimizer, list(session.model.parameters()))
    own = head_parameters(session.model)
    if session.head_optimizer is None:
        groups = parameter_groups(session.model, session.config.weight_decay, only=own.values())
        session.head_optimizer = torch.optim.AdamW(groups, lr=session.config.head_warmup_lr, betas=(0.9, 0.999),
                                                   eps=1e-6, fused=True)
    objective = MaskedLMObjective(session.model, unpad=_unwrap(session.objective).unpad)
    return Phase("head", objective, session.head_optimizer, list(own.values()))


def _unwrap(objective: torch.nn.Module) -> torch.nn.Module:
    return objective.module if isinstance(objective, DistributedDataParallel) else objective


def step_learning_rate(config: TrainConfig, state: TrainState) -> float:
    """Constant --head-warmup-lr in the head phase; then warmup + decay over the steps left after it."""
    if state.phase == "head":
        return config.head_warmup_lr
    start = state.head.full_phase_start
    return learning_rate_at(state.step - start, peak_lr=config.lr, warmup_steps=config.resolved_warmup_steps,
                            max_steps=config.max_steps - start, min_lr_ratio=config.min_lr_ratio)


def train_step(session: Session, state: TrainState, prepared: tuple[list[dict], SamplerState],
               phase: Phase | None = None) -> tuple[StepSums, SamplerState]:
    """One optimizer step on `prepared` (the global batch at `state`, from `batch_feed`), queued on the
    device; returns its sums (read them with `.values()`) and the next sampler state."""
    config, context = session.config, session.context
    phase = phase or enter_phase(session, state)
    lr = step_learning_rate(config, state)
    for group in phase.optimizer.param_groups:
        group["lr"] = lr
    # Dropout draws depend only on (seed, step, rank): a resumed run repeats them exactly.
    torch.manual_seed(config.seed * 1_000_003 + state.step * 7919 + context.rank)
    batches, next_sampler = prepared
    # Normalise by the masked tokens of the whole global batch so the update does not
    # depend on how the batch is split into micro-batches and processes.
    local_masked = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
    denominator = masked_denominator(local_masked, context)
    sums = torch.zeros(4, dtype=torch.float64, device=context.device)  # loss_sum, correct, masked, real tokens
    for index, batch in enumerate(batches):
        batch = {key: value.to(context.device, non_blocking=True) for key, value in batch.items()}
        sync = index == len(batches) - 1 or not phase.uses_ddp
        with (contextlib.nullcontext() if sync else phase.objective.no_sync()), session.autocast:
            loss_sum, correct, count = phase.objective(**batch)
        session.scaler.scale(loss_sum / denominator).backward()
        sums += torch.stack([loss_sum.detach().double(), correct.double(), count.double(),
                             batch["attention_mask"].sum().double()])
    if context.is_distributed and not phase.uses_ddp:
        average_gradients(phase.parameters, context)
    session.scaler.unscale_(phase.optimizer)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(phase.parameters, config.grad_clip)
    session.scaler.step(phase.optimizer)
    session.scaler.update()
    phase.optimizer.zero_grad(set_to_none=True)
    all_reduce_sum(sums, context)
    return StepSums(sums, lr), next_sampler


def masked_denominator(local_masked: int, context: DistContext) -> float | torch.Tensor:
    """What each rank divides its loss sum by: the global batch's masked tokens / ranks (DDP averages the
    gradients over ranks). Across ranks it stays a device scalar: reading it back would make the host wait
    for the device at the start of every step."""
    if not context.is_distributed:
        return float(max(local_masked, 1))
    # torch.full fills on the device; torch.tensor(x, device=...) would copy from pageable memory and wait for it.
    global_masked = all_reduce_sum(torch.full((), float(local_masked), device=context.device), context)
    return global_masked.clamp(min=1.0) / context.world_size


def average_gradients(parameters: list[torch.nn.Parameter], context: DistContext) -> None:
    """What DDP does for the whole model, for the head phase's few tensors: one all-reduce, / ranks."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    all_reduce_sum(flat, context)
    flat /= context.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class StepSums:
    """One step's sums, copied back from the device as soon as the step is done, without waiting for
    work queued after it: the loop reads step k's while step k + 1 runs, so the GPU is not left idle
    between steps (reading them at once would wait for the device to drain)."""

    def __init__(self, sums: torch.Tensor, lr: float):
        self.lr = lr
        self._ready = None
        if sums.device.type == "cuda":
            self._host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            self._host.copy_(sums, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = sums

    def values(self) -> dict:
        """{lr, loss_sum, correct, masked, tokens}; waits for this step only."""
        if self._ready is not None:
            self._ready.synchronize()
        loss_sum, correct, masked, tokens = self._host.tolist()
        return {"lr": self.lr, "loss_sum": loss_sum, "correct": correct, "masked": masked, "tokens": int(tokens)}
