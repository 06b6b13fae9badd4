"""Validation: MLM loss and accuracy on the val shards at masks fixed by the seed.

Every evaluation of a run masks the same positions (the training masking mode and rate, drawn
from generators seeded by (seed, EVAL_EPOCH, index)), so numbers at different steps compare.

    metrics = evaluate_mlm(objective, val_shards, spec, seed=42, max_sequences=2000, ...)
    metrics = validation_metrics(session)     # a training session's val split(s), as the loop logs them
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from cpt.data.shards import ShardSet
from cpt.training.batches import MaskingSpec, build_batch, micro_batches
from cpt.training.distributed import DistContext, all_reduce_sum

if TYPE_CHECKING:
    from cpt.training.session import Session

EVAL_EPOCH = 1 << 30  # an epoch number training never reaches: eval masks differ from any training masks


@torch.no_grad()
def evaluate_mlm(
    objective: torch.nn.Module,
    shards: ShardSet,
    spec: MaskingSpec,
    *,
    seed: int,
    max_sequences: int,
    micro_batch_size: int,
    context: DistContext,
    autocast: contextlib.AbstractContextManager | None = None,
    max_width: int | None = None,
) -> dict[str, float]:
    """val_mlm_loss (mean cross-entropy per masked token), val_mlm_acc and the masked-token count."""
    # Never through DDP: its forward is a collective (buffer broadcast), and ranks may hold different numbers
    # of val sequences (fewer sequences than ranks left some with none, and the others waited forever).
    if isinstance(objective, torch.nn.parallel.DistributedDataParallel):
        objective = objective.module
    was_training = objective.training
    objective.eval()
    picks = [(EVAL_EPOCH, index) for index in range(min(len(shards), max_sequences))]
    mine = picks[context.rank :: context.world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)  # loss_sum, correct, count
    for chunk in micro_batches(mine, micro_batch_size):
        batch = {key: value.to(context.device) for key, value in build_batch(shards, chunk, spec, seed, max_width).items()}
        with autocast or contextlib.nullcontext():
            loss_sum, correct, count = objective(**batch)
        totals += torch.stack([loss_sum.double(), correct.double(), count.double()])
    all_reduce_sum(totals, context)
    objective.train(was_training)
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        return {"val_mlm_loss": math.nan, "val_mlm_acc": math.nan, "val_masked_tokens": 0}
    return {"val_mlm_loss": loss_sum / count, "val_mlm_acc": correct / count, "val_masked_tokens": int(count)}


def evaluate_split(session: Session, shards: ShardSet, max_sequences: int | None = None) -> dict[str, float]:
    """evaluate_mlm on `shards` with the session's model, masking, micro-batch and precision
    (at most --eval-max-sequences sequences, or `max_sequences`)."""
    config = session.config
    return evaluate_mlm(session.objective, shards, session.spec, seed=config.seed,
                        max_sequences=config.eval_max_sequences if max_sequences is None else max_sequences,
                        micro_batch_size=session.micro_batch_size, context=session.context,
                        autocast=session.autocast, max_width=session.seq_length)


def validation_metrics(session: Session) -> dict[str, float]:
    """val_mlm_* on the domain val split; with --replay-share also replay_val_mlm_* on the replay's (forgetting)."""
    metrics = evaluate_split(session, session.val_set)
    if session.replay_val_set is not None:
        metrics.update({f"replay_{key}": value for key, value in evaluate_split(session, session.replay_val_set).items()})
    return metrics
