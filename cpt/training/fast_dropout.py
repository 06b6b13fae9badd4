"""Cheaper dropout for CPU training: the same distribution as `nn.Dropout`, a quarter of the random bits.

On CPU, drawing dropout masks (`aten::bernoulli_`, one float per element) was the largest cost after
the matrix multiplies: 12% of a training step in fp32 and 18% under bf16 autocast, for 13 dropout
calls per step in a 4-layer BERT. Here a mask element is 16 random bits, four per int64 draw, and
an element is dropped when its bits fall below round(p * 65536): p = 0.1 becomes 0.100006. The
bits come from torch's default generator, so `torch.manual_seed` and saved RNG states still make a
run reproducible (but its masks differ from `nn.Dropout`'s).

SDPA's fast CPU kernel has no dropout, so in training the attention probabilities went through
the unfused "math" path anyway; `dropout_attention` runs that path itself with the cheap mask
and keeps SDPA whenever dropout is off (evaluation).

    use_fast_dropout(model)      # swaps every nn.Dropout and the attention function; weights untouched
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_NAME = "cpt_dropout"
MASK_LEVELS = 1 << 16


def random_bits(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """16 uniform random bits per element, int16 of `shape`: four per int64 draw of the default generator."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.int16)[:count].view(shape)  # uniform over [-32768, 32767]


def drop_levels(p: float) -> int:
    """How many of the 65536 values of 16 random bits drop an element: p rounded to 1/65536."""
    return round(p * MASK_LEVELS)


def mask_from_bits(bits: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0/1 in `dtype`, 0 where an element is dropped (its bits fall below drop_levels(p) levels).

    Written straight in the data's dtype: multiplying by a bool mask took 4x longer on CPU."""
    threshold = drop_levels(p) - MASK_LEVELS // 2
    return torch.ge(bits, threshold, out=torch.empty(bits.shape, dtype=dtype, device=bits.device))


def keep_probability(p: float) -> float:
    return 1.0 - drop_levels(p) / MASK_LEVELS


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, p: float) -> torch.Tensor:
        keep_prob = keep_probability(p)
        ctx.p, ctx.scale = p, (1.0 / keep_prob if keep_prob > 0 else 0.0)  # p = 1 drops everything, as nn.Dropout
        bits = random_bits(inputs.shape, inputs.device)
        keep = mask_from_bits(bits, p, inputs.dtype)
        # Kept for backward at 2 bytes an element: a bf16/fp16 mask is that already; an fp32 mask would
        # take 4, so fp32 keeps the int16 bits and rebuilds its mask in backward (one more pass).
        ctx.save_for_backward(keep if keep.element_size() <= 2 else bits)
        return _apply_mask(inputs, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (saved,) = ctx.saved_tensors
        keep = mask_from_bits(saved, ctx.p, grad.dtype) if saved.dtype == torch.int16 else saved.to(grad.dtype)
        return _apply_mask(grad, keep, ctx.scale), None


def _apply_mask(values: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    # The scale multiplies separately, in fp32 arithmetic: folded into a bf16 mask it would round
    # (1/0.9 -> 1.109: every kept value 0.16 % too small).
    return (values * keep).mul_(scale)


def fast_dropout(inputs: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return inputs
    return _Dropout.apply(inputs, p)


class FastDropout(torch.nn.Module):
    """Drop-in for nn.Dropout (same `p` attribute, same train/eval behaviour)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return fast_dropout(inputs, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention_with_dropout(query, key, value, keep_keys: torch.Tensor | None, dropout_p: float,
                           scaling: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling) v over (B, heads, T, d); keep_keys: bool, broadcastable to (B, heads, T, T).

    With dropout, scores and softmax are computed in fp32 even under bf16 autocast, as SDPA's math
    path does on CPU (bf16 scores doubled the attention error); the result has the query's dtype."""
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=keep_keys, scale=scaling)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.float() * scaling, key.float().transpose(-2, -1))  # (B, heads, T, T) fp32
        if keep_keys is not None:
            scores = scores.masked_fill(~keep_keys, torch.finfo(scores.dtype).min)
        probs = fast_dropout(torch.softmax(scores, dim=-1), dropout_p)
        return torch.matmul(probs, value.float()).to(query.dtype)


def dropout_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **_kwargs):
    """transformers' attention-function interface: (B, heads, T, d) in, (B, T, heads, d) out."""
    dropout_p = dropout if module.training else 0.0
    context = attention_with_dropout(query, key, value, attention_mask, dropout_p, scaling)
    return context.transpose(1, 2).contiguous(), None


def use_fast_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every nn.Dropout for FastDropout and route attention through `dropout_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Dropout):
                setattr(module, name, FastDropout(child.p))
    AttentionInterface.register(ATTENTION_NAME, dropout_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)  # bool (B, 1, T, T) masks, as for SDPA
    model.set_attn_implementation(ATTENTION_NAME)
    return model
