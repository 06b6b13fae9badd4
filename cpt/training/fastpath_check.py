"""The unpadded fast path, checked on the device before it trains.

The unpadded path (cpt/training/unpadded.py: flash `varlen_attn` on CUDA) is the one part of training that
no CPU test can run. So `cpt train` checks it where it runs: at the start of training, on real
sequences of the run's first global batch (the shortest to the longest, masked as in training),
the unpadded path and the stock padded SDPA path run forward and backward with dropout off and the
same weights; the MLM loss, the logits at the masked positions and a few parameter gradients
(attention Q/K/V of the first layer, which carry dq/dk/dv; the last layer's attention and FFN
output) must agree within the precision's tolerance. On a mismatch or an error it warns once with
the numbers and trains on the padded path: slower, never wrong.

The check neither draws from nor reseeds any random generator a training run uses (dropout off,
generators forked), and leaves `.grad` untouched (torch.autograd.grad): a run trains the same
weights with or without it.

    kept = guard_unpadded_path(session)   # in start_session; False: the session now trains padded
    comparison = compare_paths(model, batch, autocast, attention=kernel)   # the comparison alone
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cpt.common.runtime import info, warn
from cpt.errors import first_line
from cpt.training.batches import SamplerState, build_batch, next_global_batch
from cpt.training.distributed import broadcast_flag
from cpt.training.model import masked_lm_logits
from cpt.training.unpadded import METADATA_KEYS, unpadding_metadata

CHECK_SEQUENCES = 8  # spread over the first global batch's lengths; small beside what autobatch measures
# Relative errors allowed between the two paths, |a - b| / |b| (L2 norms). bf16 carries 8 mantissa bits,
# fp16 11: kernels that sum in another order differ by ~1e-2 / ~1e-3 after 24 layers. To be calibrated on
# the first device run (bench/gpu_bench.py records the measured errors).
TOLERANCES = {
    "fp32": {"loss": 1e-4, "logits": 1e-3, "grads": 1e-3},
    "fp16": {"loss": 5e-3, "logits": 1e-2, "grads": 3e-2},
    "bf16": {"loss": 1e-2, "logits": 3e-2, "grads": 5e-2},
}


@dataclass
class PathComparison:
    """Relative errors of the unpadded path against the padded one (or the error it raised)."""

    sequences: int = 0
    masked: int = 0
    loss_rel: float = math.nan
    logits_rel: float = math.nan
    grads_rel: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def failures(self, precision: str) -> list[str]:
        """What is out of tolerance, one phrase each; empty when the unpadded path agrees."""
        if self.error is not None:
            return [f"the unpadded path raised {self.error}"]
        limits = TOLERANCES.get(precision, TOLERANCES["bf16"])
        found = [f"{name} rel. error {value:.2e} > {limits[name]:.0e}"
                 for name, value in (("loss", self.loss_rel), ("logits", self.logits_rel))
                 if not value <= limits[name]]  # NaN fails too
        found += [f"grad {name} rel. error {value:.2e} > {limits['grads']:.0e}"
                  for name, value in self.grads_rel.items() if not value <= limits["grads"]]
        return found

    def summary(self) -> str:
        worst = max(self.grads_rel.values(), default=math.nan)
        return (f"loss {self.loss_rel:.2e}, logits {self.logits_rel:.2e}, worst gradient {worst:.2e} "
                f"(relative errors, {self.sequences} sequences, {self.masked} masked tokens)")

    def as_dict(self) -> dict:
        return {"sequences": self.sequences, "masked": self.masked, "loss_rel": self.loss_rel,
                "logits_rel": self.logits_rel, "grads_rel": dict(self.grads_rel), "error": self.error}


def should_check(device: torch.device) -> bool:
    """Only CUDA runs the flash kernel; on CPU the unpadded path is the reference kernel, tested in the suite."""
    return device.type == "cuda"


def check_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters whose gradients are compared: dq/dk/dv reach the first layer's Q/K/V weights."""
    layers = model.base_model.encoder.layer
    first, last = layers[0], layers[-1]
    picked = {
        "layer0.query": first.attention.self.query.weight, "layer0.key": first.attention.self.key.weight,
        "layer0.value": first.attention.self.value.weight,
        f"layer{len(layers) - 1}.attention_output": last.attention.output.dense.weight,
        f"layer{len(layers) - 1}.ffn_output": last.output.dense.weight,
    }
    return {name: parameter for name, parameter in picked.items() if parameter.requires_grad}


def check_batch(shards, spec, seed: int, seq_length: int, global_batch_size: int,
                sequences: int = CHECK_SEQUENCES) -> dict[str, torch.Tensor]:
    """Up to `sequences` real sequences of the run's first global batch, the shortest to the longest, masked
    as training masks them (their own seeded generators: no shared random state is used)."""
    picks, _ = next_global_batch(SamplerState(), num_sequences=len(shards), count=min(global_batch_size, len(shards)),
                                 seed=seed)
    picks = sorted(picks, key=lambda pick: shards.length(pick[1]))
    if len(picks) > sequences:
        picks = [picks[round(i * (len(picks) - 1) / (sequences - 1))] for i in range(sequences)]
    return build_batch(shards, picks, spec, seed, max_width=seq_length)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


def _run_path(model, batch: dict, autocast, parameters: list[torch.Tensor], *, unpad: bool, attention):
    # A batch with the loader's unpadding metadata (as training batches carry) runs both paths with it.
    metadata = {key: batch[key] for key in METADATA_KEYS if key in batch} or None
    with autocast:
        logits, targets = masked_lm_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                           unpad=unpad, attention=attention, metadata=metadata)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return loss.detach().float(), logits.detach().float(), [None if g is None else g.float() for g in grads]


def compare_paths(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast=None,
                  attention=None) -> PathComparison:
    """The unpadded path (with `attention` as its varlen kernel; default: the device's) against the padded one,
    forward and backward, dropout off; model mode, random generators and `.grad` are left as they were."""
    autocast = autocast or contextlib.nullcontext()
    parameters = check_parameters(model)
    device = batch["input_ids"].device
    comparison = PathComparison(sequences=int(batch["input_ids"].shape[0]))
    was_training = model.training
    model.eval()  # dropout off: both paths must compute the same function
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            want_loss, want_logits, want_grads = _run_path(model, batch, autocast, list(parameters.values()),
                                                           unpad=False, attention=None)
            try:
                got_loss, got_logits, got_grads = _run_path(model, batch, autocast, list(parameters.values()),
                                                            unpad=True, attention=attention)
            except Exception as error:  # any failure of the fast path means: do not train on it
                comparison.error = f"{type(error).__name__}: {first_line(error)}"
                return comparison
    finally:
        model.train(was_training)
    comparison.masked = int(want_logits.shape[0])
    comparison.loss_rel = float((got_loss - want_loss).abs() / want_loss.abs().clamp(min=1e-12))
    comparison.logits_rel = _relative(got_logits, want_logits) if got_logits.shape == want_logits.shape else math.inf
    for name, got, want in zip(parameters, got_grads, want_grads, strict=True):
        if want is not None:
            comparison.grads_rel[name] = math.inf if got is None else _relative(got, want)
    return comparison


def guard_unpadded_path(session, attention=None) -> PathComparison | None:
    """Check the session's unpadded path where it runs on flash (CUDA); on a mismatch or an error on any rank,
    warn once and switch the session to the padded path. Call before DDP wraps the objective. Returns the
    comparison (None where nothing was checked)."""
    context = session.context
    objective = getattr(session.objective, "module", session.objective)
    if not objective.unpad or not should_check(context.device):
        return None
    batch = check_batch(session.train_set, session.spec, session.config.seed, session.seq_length,
                        session.config.global_batch_size)
    if session.batching.with_unpadding_metadata:  # check the path training takes: metadata built on the host
        batch = {**batch, **unpadding_metadata(batch["attention_mask"], batch["labels"])}
    batch = {key: value.to(context.device) for key, value in batch.items()}
    comparison = compare_paths(session.model, batch, session.autocast, attention)
    failures = comparison.failures(session.precision)
    del batch
    if context.device.type == "cuda":
        torch.cuda.empty_cache()
    if not broadcast_flag(bool(failures), context):
        info(f"train: unpadded path checked against the padded SDPA path ({session.precision}): "
             f"{comparison.summary()}")
        return comparison
    objective.unpad = False
    reason = "; ".join(failures) if failures else "the check failed on another rank"
    warn(f"the unpadded fast path disagrees with the padded path on this device ({reason}; {comparison.summary()}): "
         "training on the padded SDPA path instead (slower, same model). Please report this with the numbers; "
         "--unpad off skips the check")
    return comparison


__all__ = ["PathComparison", "TOLERANCES", "check_batch", "compare_paths", "guard_unpadded_path", "should_check"]
