"""The learning rate as a pure function of the optimizer step: linear warmup, then linear decay.

    lr = learning_rate_at(step, peak_lr=5e-5, warmup_steps=500, max_steps=50000, min_lr_ratio=0.0)
"""

from __future__ import annotations


def learning_rate_at(step: int, *, peak_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """lr for the update that takes the model from `step` to `step + 1` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress))
