"""The MLM head check at step 0 and the head warm-up phase (`--head-warmup auto|off|N`).

hfl/chinese-roberta-wwm-ext-large was published with a randomly initialised MLM head (transform
dense + LayerNorm and the output bias; only the decoder, tied to the word embeddings, is real).
Continued pretraining from it pushes the pretrained encoder with gradients from a random head. So
at step 0, before any weight changes, cpt scores the stored head on the val masks against a fresh
head (the model's own init, same positions) and against a uniform guess (ln V):

    check = check_head(model, stored_val_loss, evaluate, seed=42)   # evaluate() -> val metrics
    check.untrained   # stored loss > ln V, or not clearly better than a fresh head

When the head is untrained (or --head-warmup N asks), the run starts with a head phase: only the
head's own parameters train, at --head-warmup-lr, with the encoder and embeddings (the tied
decoder too) frozen, until the val loss stops improving or the phase's step cap; then the normal
warmup + decay schedule starts for the whole model. --max-steps counts every optimizer step, the
head phase's included: step numbers, checkpoints and metrics stay one sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cpt.common.files import write_json_atomic
from cpt.common.runtime import info, warn

if TYPE_CHECKING:
    from cpt.training.session import Session

AUTO_MAX_STEPS = 1000  # auto: the head phase takes at most this many steps ...
AUTO_SHARE_OF_RUN = 0.1  # ... and at most this share of --max-steps
UNTRAINED_MARGIN_NATS = 1.0  # a trained head beats a fresh one, and is within this of the unigram baseline or better
UNIGRAM_SAMPLE_TOKENS = 20_000_000  # train tokens counted for the unigram baseline (about 1 s of numpy)
MIN_IMPROVEMENT_SHARE = 0.01  # the head phase ends at the first eval that lowers val loss by less than 1 %
EVALS_PER_HEAD_PHASE = 10  # evaluations spread over the phase's step cap (for the early stop)
CHECK_FILE = "head_check.json"


@dataclass
class HeadCheck:
    """What the step-0 check measured (val loss per masked token, in nats) and concluded."""

    stored_val_loss: float
    fresh_val_loss: float
    uniform_loss: float
    unigram_loss: float
    untrained: bool
    reason: str

    def as_record(self) -> dict:
        return asdict(self)


@dataclass
class HeadPhaseState:
    """The head phase's part of the training state (saved in every checkpoint's state.json).

    max_steps: the phase's step cap (0: no head phase); end_step: the step it ended at (None while it
    runs); best_val_loss: its best evaluation so far (for the early stop)."""

    max_steps: int = 0
    end_step: int | None = None
    best_val_loss: float | None = None

    @property
    def active(self) -> bool:
        return self.max_steps > 0 and self.end_step is None

    @property
    def full_phase_start(self) -> int:
        """The step at which the whole-model schedule (warmup + decay) begins."""
        return self.end_step or 0

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, record: dict | None) -> HeadPhaseState:
        record = record or {}
        return cls(max_steps=int(record.get("max_steps", 0)), end_step=record.get("end_step"),
                   best_val_loss=record.get("best_val_loss"))


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    for name in ("cls", "lm_head"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no masked-LM head (cls/lm_head)")


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The head's own parameters (transform dense + LayerNorm + output bias), without the decoder
    weight, which is the word embedding matrix."""
    tied = {id(model.get_input_embeddings().weight)}
    return {name: parameter for name, parameter in head_module(model).named_parameters() if id(parameter) not in tied}


def freeze_all_but_head(model: torch.nn.Module, head_only: bool) -> None:
    """head_only: only the head's own parameters take gradients; else every parameter does."""
    trainable = {id(parameter) for parameter in head_parameters(model).values()}
    for parameter in model.parameters():
        parameter.requires_grad_(not head_only or id(parameter) in trainable)


@torch.no_grad()
def reinit_head(model: torch.nn.Module, seed: int) -> None:
    """The model's own init for the head's parameters (normal(0, initializer_range) weights, zero
    biases, LayerNorm 1/0), from a generator of its own: the global random streams stay untouched."""
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    own = head_parameters(model)
    for module in head_module(model).modules():
        if isinstance(module, torch.nn.Linear) and any(module.weight is p for p in own.values()):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
        elif isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
    for name, parameter in own.items():
        if name.endswith("bias"):
            parameter.zero_()


def unigram_loss(train_set, val_set, vocab_size: int, special_ids: np.ndarray) -> float:
    """Cross-entropy (nats per token) of the train split's token frequencies on the val tokens: the score of
    a head that knows nothing but how often each token occurs. Any MLM training gets there within tens of
    steps; a random head (of any seed) is far from it."""
    train = train_set.token_counts(vocab_size, UNIGRAM_SAMPLE_TOKENS).astype(np.float64)
    val = val_set.token_counts(vocab_size, UNIGRAM_SAMPLE_TOKENS).astype(np.float64)
    train[special_ids] = 0.0
    val[special_ids] = 0.0
    probabilities = (train + 0.5) / (train.sum() + 0.5 * vocab_size)  # add-half smoothing: unseen tokens stay finite
    return float(-(val * np.log(probabilities)).sum() / max(val.sum(), 1.0))


def check_head(model: torch.nn.Module, stored_val_loss: float, evaluate: Callable[[], dict], *,
               seed: int, unigram: float) -> HeadCheck:
    """Score a fresh head on the same val masks as the stored one (the model is left as it was) and judge
    the stored one against it, a uniform guess and the unigram baseline."""
    saved = {name: parameter.detach().clone() for name, parameter in head_parameters(model).items()}
    reinit_head(model, seed)
    try:
        fresh_val_loss = float(evaluate()["val_mlm_loss"])
    finally:
        with torch.no_grad():
            for name, parameter in head_parameters(model).items():
                parameter.copy_(saved[name])
    uniform = math.log(model.config.vocab_size)
    untrained, reason = judge_head(stored_val_loss, fresh_val_loss, uniform, unigram)
    return HeadCheck(stored_val_loss=stored_val_loss, fresh_val_loss=fresh_val_loss, uniform_loss=uniform,
                     unigram_loss=unigram, untrained=untrained, reason=reason)


def judge_head(stored_val_loss: float, fresh_val_loss: float, uniform_loss: float,
               unigram_loss: float) -> tuple[bool, str]:
    """(untrained?, why): worse than a uniform guess, not clearly better than a fresh head, or clearly worse
    than knowing the token frequencies (the unigram baseline). The last catches random heads that happen to
    beat the one fresh head drawn: two random heads of the model's own init differ by up to 2.6 nats on the
    same masks (measured on a tiny pretrained BERT), while every MLM-trained head is at or below the unigram
    baseline."""
    if math.isnan(stored_val_loss):  # no val sequence to score on: nothing to judge by
        return False, "not checked: the val split is empty (--val-fraction / --max-val-docs 0)"
    if not math.isfinite(stored_val_loss) or stored_val_loss > uniform_loss:
        return True, f"val loss {stored_val_loss:.3f} is worse than a uniform guess (ln V = {uniform_loss:.3f})"
    if stored_val_loss > fresh_val_loss - UNTRAINED_MARGIN_NATS:
        return True, (f"val loss {stored_val_loss:.3f} is no better than a freshly initialised head's "
                      f"{fresh_val_loss:.3f}")
    if stored_val_loss > unigram_loss + UNTRAINED_MARGIN_NATS:
        return True, (f"val loss {stored_val_loss:.3f} is worse than predicting token frequencies alone "
                      f"({unigram_loss:.3f})")
    return False, (f"val loss {stored_val_loss:.3f} vs {fresh_val_loss:.3f} for a fresh head, {unigram_loss:.3f} "
                   f"for token frequencies alone and {uniform_loss:.3f} for a uniform guess")


def planned_head_steps(setting: str, untrained: bool, max_steps: int) -> int:
    """The head phase's step cap: N as asked; auto: on when untrained, at most 1000 steps and 10 % of
    the run; off: 0."""
    if setting == "off":
        return 0
    if setting == "auto":
        return min(AUTO_MAX_STEPS, max(1, int(max_steps * AUTO_SHARE_OF_RUN))) if untrained else 0
    return int(setting)


def head_eval_interval(max_head_steps: int, eval_interval: int) -> int:
    """How often the head phase evaluates (its early stop needs a few evaluations)."""
    return max(1, min(eval_interval, max_head_steps // EVALS_PER_HEAD_PHASE))


def after_head_eval(state: HeadPhaseState, step: int, val_loss: float) -> bool:
    """Update the phase with this (scheduled) evaluation; True when the phase ends at `step`. Without val
    data (NaN) only the cap ends it."""
    if math.isnan(val_loss):
        if step >= state.max_steps:
            state.end_step = step
        return state.end_step is not None
    improved = state.best_val_loss is None or val_loss < state.best_val_loss * (1 - MIN_IMPROVEMENT_SHARE)
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
    if not improved or step >= state.max_steps:
        state.end_step = step
        return True
    return False


def check_line(check: HeadCheck, setting: str, max_head_steps: int, head_lr: float, reinitialised: bool) -> str:
    """The one line that says what the check found and what cpt does about it."""
    verdict = "UNTRAINED" if check.untrained else "trained"
    if max_head_steps:
        plan = (f"warming the head up alone for up to {max_head_steps} steps at lr {head_lr:g} "
                f"(encoder and embeddings frozen{', head re-initialised first' if reinitialised else ''}), "
                "then training the whole model")
    elif check.untrained:
        plan = "--head-warmup off: training the whole model from this head as asked"
    else:
        plan = "no head warm-up needed"
    return f"MLM head check: {verdict}: {check.reason}; {plan}"


def off_warning(check: HeadCheck) -> str:
    return ("the base model's MLM head is untrained and --head-warmup is off: its random predictions push the "
            "pretrained encoder for the first hundreds of steps, which can leave the model worse than the base; "
            "use --head-warmup auto")


def run_head_check(session: Session, stored_val_loss: float, evaluate: Callable[[], dict]) -> HeadCheck:
    """The step-0 check of the base's MLM head on this session's data; `evaluate()` scores the model on the
    val masks the stored loss came from."""
    unigram = unigram_loss(session.train_set, session.val_set, session.model.config.vocab_size,
                           session.spec.special_ids)
    return check_head(session.model, stored_val_loss, evaluate, seed=session.config.seed, unigram=unigram)


def start_head_phase(session: Session, check: HeadCheck) -> int:
    """Say what the step-0 head check found, record it in RUN_DIR/head_check.json and plan the head phase;
    returns its step cap (0: none). A head that scores worse than a fresh one is re-initialised (the
    model's own init) before it."""
    config, context = session.config, session.context
    max_head_steps = planned_head_steps(config.head_warmup, check.untrained, config.max_steps)
    reinitialised = bool(max_head_steps) and check.untrained and check.fresh_val_loss < check.stored_val_loss
    if reinitialised:
        reinit_head(session.model, config.seed)
    info(check_line(check, config.head_warmup, max_head_steps, config.head_warmup_lr, reinitialised))
    if check.untrained and not max_head_steps:
        warn(off_warning(check))
    if context.is_main_process:
        write_json_atomic(Path(config.output) / CHECK_FILE, {
            **check.as_record(), "head_warmup": config.head_warmup, "head_warmup_max_steps": max_head_steps,
            "head_warmup_lr": config.head_warmup_lr, "reinitialised": reinitialised})
    return max_head_steps
