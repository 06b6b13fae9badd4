"""Every speed-up `cpt train` applies only on a CPU, each with its gain as measured in docs/benchmarks.md
(4-layer / 256 BERT, vocab 21128, 16 x 128 tokens, 1 thread; CPU-s per step):

    tune_cpu_training(model, compiled=False)   # in cpt.training.session.start_session, before the optimizer

- bf16 autocast where the CPU multiplies bf16 natively (`cpu_has_native_bf16`: AMX or AVX512-BF16;
  `--precision auto` picks it, cpt.training.session.autocast_for): 1.4-1.7x per step against fp32.
- Cheap dropout (`use_fast_dropout`, `FastDropout`, `dropout_attention`): a dropout mask from 16
  random bits per element instead of a float (`bernoulli_` was 12 % of the fp32 step and 18 % under
  bf16), written straight in the data's dtype: about 1.3x on top of bf16, 1.05x in fp32
  (bf16 + cheap dropout: 1.86-2.08x against fp32 with stock dropout).
- `keep_cpu_activations_in_bf16`: under bf16 autocast the residual stream stays bf16 (70 casts of
  (16, 128, 256) per step gone); with the fused loss of cpt/training/mlm_loss.py and the dtype masks
  above: 0.386 -> 0.319 CPU-s per step, 1.23x.
- `reuse_freed_memory`: glibc keeps freed blocks instead of unmapping them: 17,600-18,900 minor
  page faults and 29-37 ms of kernel time per step -> 52-290 faults and 0.2 ms; median step
  0.31-0.46 -> 0.28-0.34 s, peak RSS unchanged.

The checkpoints and the exported model have the same format and dtypes as without them; the
trained values differ as any change of rounding or of dropout draws makes them differ. CUDA runs and
`--compile` leave the model untouched (torch.compile breaks its graph at every random_() of the cheap
dropout).

How the cheap dropout works: an element is dropped when its 16 random bits (four per int64 draw of
torch's default generator, so `torch.manual_seed` and saved RNG states still make a run reproducible,
though its masks differ from `nn.Dropout`'s) fall below round(p * 65536): p = 0.1 becomes 0.100006.
SDPA's fast CPU kernel has no dropout, so in training the attention probabilities went through the
unfused "math" path anyway; `dropout_attention` runs that path itself with the cheap mask and keeps
SDPA whenever dropout is off (evaluation).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
import torch.nn.functional as F

# ---- cheap dropout ----

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


# ---- memory: keep freed blocks for the next step ----

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest on 64-bit: above it mallopt refuses
TRIM_THRESHOLD_BYTES = 1 << 30  # freed memory at the heap's top kept up to this


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks (up to its limits) instead of unmapping them; False where
    the C library has no `mallopt` (musl, macOS) or refuses: nothing changes there."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1


def keep_cpu_activations_in_bf16(model: torch.nn.Module) -> None:
    """Under CPU bf16 autocast, hand the encoder bf16 hidden states (the embeddings' output, cast once).

    Autocast alone leaves the residual stream in fp32 (a bf16 linear output plus an fp32 residual
    is fp32, LayerNorm keeps it so), and every linear then casts its input back to bf16: ~10 % of a
    CPU step went to those casts. With bf16 from the embeddings on, the stream stays bf16 (LayerNorm
    takes bf16 with fp32 weights; weights and their gradients stay fp32), as in pure-bf16 training
    (Megatron-LM's default keeps the residual in bf16 too). fp32 runs and CUDA are untouched."""
    def cast_output(_module, _inputs, output):
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return output.to(torch.bfloat16)
        return output

    model.base_model.embeddings.register_forward_hook(cast_output)


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: bf16 matmuls run in hardware (elsewhere oneDNN emulates them, slower than fp32)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes) and torch.backends.mkldnn.is_available()


def tune_cpu_training(model: torch.nn.Module, compiled: bool = False) -> None:
    """The CPU speed-ups that change the model: malloc reuse always, cheap dropout and bf16 activations
    unless compiled."""
    reuse_freed_memory()
    if not compiled:  # torch.compile breaks its graph at every random_() of the cheap dropout
        use_fast_dropout(model)
        keep_cpu_activations_in_bf16(model)
