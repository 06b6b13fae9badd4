"""What `cpt train` changes when it trains on a CPU, for speed; each measured in docs/benchmarks.md.

    tune_cpu_training(model, compiled=False)   # in cpt.training.loop.start_session, before the optimizer

- `reuse_freed_memory`: glibc hands large allocations to mmap and unmaps them on free (its
  threshold adapts between 128 KiB and 32 MiB) and trims the heap's top, so each step's fresh
  (V, H) and (rows, V) tensors were page-faulted in again: ~18,000 minor faults and ~30 ms of
  kernel time per step of the 4-layer / 256 BERT (10 % of the step). Fixing the mmap threshold at
  glibc's cap (32 MiB) and raising the trim threshold keeps freed memory in the heap for the next
  step. Blocks above 32 MiB (a BERT-large decoder gradient: 86 MB) are still mapped per use.
- `use_fast_dropout` (cpt/training/fast_dropout.py): dropout masks from 16 random bits per element.
- `keep_cpu_activations_in_bf16`: under bf16 autocast the encoder's hidden states stay bf16.
The checkpoints and the exported model have the same format and dtypes as without them; the
trained values differ as any change of rounding or of dropout draws makes them differ.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from cpt.training.fast_dropout import use_fast_dropout

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


def tune_cpu_training(model: torch.nn.Module, compiled: bool = False) -> None:
    reuse_freed_memory()
    if not compiled:  # torch.compile breaks its graph at every random_() of the cheap dropout
        use_fast_dropout(model)
        keep_cpu_activations_in_bf16(model)
