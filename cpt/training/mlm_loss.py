"""Summed cross-entropy and correct-prediction count over the masked rows' logits, in one pass.

    loss_sum, correct = summed_cross_entropy(logits, targets)   # logits (P, V) any float dtype, targets (M,), P >= M

Rows of `logits` past the M targets are padding (the prediction head runs on a multiple of 64
rows): no loss, a zero gradient.

Same values as `F.cross_entropy(logits.float(), targets, reduction="sum")` and
`(logits.argmax(-1) == targets).sum()`, computed in fp32; off the CPU it is those two. Why not
those two on CPU: the prediction head's loss was ~20 % of a training step of the 4-layer / 256
BERT (M ~ 300 rows of V = 21128): an fp32 copy of the logits, log_softmax, its backward (a zero-filled gradient, a
scatter, a second pass over the saved log-probabilities) and a cast of that gradient back to
bf16, plus `argmax`, whose CPU kernel is not vectorised (16 ms on 300 x 21128 against 1.5 ms
for `amax`). Here the forward computes the row maxima, exp(x - max) once, the log-sum-exp and,
when a gradient is wanted, the gradient itself (softmax - one-hot, in the logits' dtype): the
backward is one multiply by the incoming scalar.

The correct count uses the maxima: a row is correct when its target holds the row's maximum
and is the only index that does; rows where the maximum is tied (bf16 logits tie more often) or
not finite fall back to `argmax` on those rows alone, so counts equal argmax's.

Why CPU only: the saved gradient is rounded to the logits' dtype before the backward's scale
multiplies it. On CPU that multiply reads the fp32 scale at full precision (a test pins it); a
CUDA kernel would round the scale to bf16 first, and fp16 with a loss scaler needs the scale
applied before rounding. CUDA keeps `F.cross_entropy`, which is fast there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _first_max_hits(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, maxes: torch.Tensor,
                    shifted: torch.Tensor) -> torch.Tensor:
    """Per row: does argmax (the first index of the maximum) equal the target? (M,) bool.

    rows: arange(M); maxes: the row maxima (M,); shifted: logits - maxes in fp32 (zero where the
    maximum is), left as found."""
    at_target = shifted[rows, targets]  # (M,)
    holds_max = at_target == 0
    shifted[rows, targets] = float("-inf")
    tied = shifted.amax(dim=-1) == 0  # (M,) another index holds the maximum too
    shifted[rows, targets] = at_target
    # Ties (first index wins) and rows with inf/NaN: rare, so argmax on these rows only.
    ambiguous = torch.nonzero((holds_max & tied) | ~torch.isfinite(maxes)).squeeze(1)
    hits = holds_max & ~tied
    if ambiguous.numel():
        hits[ambiguous] = logits[ambiguous].argmax(dim=-1) == targets[ambiguous]
    return hits


def _loss_correct_grad(padded_logits: torch.Tensor, targets: torch.Tensor,
                       with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed loss fp32 scalar, correct int64 scalar, d loss_sum / d padded_logits in their dtype or None)."""
    logits = padded_logits[: targets.shape[0]]  # (M, V) a view
    rows = torch.arange(logits.shape[0], device=logits.device)
    target_logits = logits[rows, targets].float()  # (M,)
    maxes = logits.amax(dim=-1).float()  # (M,) exact: a float maximum needs no rounding
    shifted = logits.to(torch.float32, copy=True).sub_(maxes[:, None])  # (M, V) fp32, <= 0; never the input
    hits = _first_max_hits(logits, rows, targets, maxes, shifted)
    exps = shifted.exp_()  # (M, V) fp32, in place: `shifted` is not needed again
    sums = exps.sum(dim=-1)  # (M,) >= 1
    loss_sum = (sums.log() - (target_logits - maxes)).sum()  # log-sum-exp - target, without rounding at max's size
    if not with_grad:
        return loss_sum, hits.sum(), None
    probs = exps.div_(sums[:, None])  # (M, V) softmax
    probs[rows, targets] -= 1.0  # softmax - one-hot, still fp32
    grad = torch.empty_like(padded_logits)
    grad[: targets.shape[0]].copy_(probs)
    grad[targets.shape[0]:].zero_()
    return loss_sum, hits.sum(), grad


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):  # noqa: ANN205 (autograd signature)
        loss_sum, correct, grad = _loss_correct_grad(logits, targets, with_grad=True)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss_sum: torch.Tensor, _grad_correct):  # noqa: ANN205
        (grad,) = ctx.saved_tensors
        # A 0-dim fp32 factor keeps the gradient's dtype and is applied in fp32 (not rounded to bf16 first).
        return grad * grad_loss_sum, None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of -log softmax(logits)[target] as an fp32 scalar, number of rows whose argmax is the target).

    logits: (P, V) float of any precision, P >= M (rows past M are padding); targets: (M,) int64 in [0, V).
    Differentiable in `logits`."""
    if logits.device.type != "cpu":
        real = logits[: targets.shape[0]].float()
        return F.cross_entropy(real, targets, reduction="sum"), (real.argmax(dim=-1) == targets).sum()
    if targets.shape[0] == 0:
        zero = logits.float().sum()  # keeps the graph connected for an empty micro-batch
        return zero, torch.zeros((), dtype=torch.int64, device=logits.device)
    if not (torch.is_grad_enabled() and logits.requires_grad):  # evaluation: no gradient to compute or keep
        loss_sum, correct, _ = _loss_correct_grad(logits, targets, with_grad=False)
        return loss_sum, correct
    return _SummedCrossEntropy.apply(logits, targets)
