"""Tests for cpt.training.cpu: the CPU training knobs do what they claim and change no result they should not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cpt.training.cpu import FastDropout, keep_cpu_activations_in_bf16, tune_cpu_training
from cpt.training.model import load_mlm_model, masked_lm_loss

ALLOCATION_PATH = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    sys.exit(99)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "reuse":
    from cpt.training.cpu import reuse_freed_memory
    if not reuse_freed_memory():
        sys.exit(99)
before = libc.mallinfo2()
block = torch.ones(6 << 20)  # 24 MiB, the size of a step's (rows, V) logits
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena, after.arena)
"""


def test_large_blocks_stay_in_the_heap_after_free():
    """glibc's default maps a fresh 24 MiB block with mmap and unmaps it on free, so the next step
    page-faults it in again (~18,000 faults a step on the 4-layer BERT, docs/benchmarks.md). With
    reuse_freed_memory the block comes from the heap and the heap keeps it after free (no trim).
    Read from glibc's own counters (mallinfo2) in fresh processes: exact, where counting page
    faults over training steps varied from run to run."""
    if os.environ.get("LD_PRELOAD") or any(name.startswith("MALLOC_") for name in os.environ):
        pytest.skip("another allocator or glibc malloc settings from the environment")
    readings = {}
    for mode in ("default", "reuse"):
        result = subprocess.run([sys.executable, "-c", ALLOCATION_PATH, mode], capture_output=True, text=True,
                                timeout=120)
        if result.returncode == 99:
            pytest.skip("no glibc mallopt/mallinfo2 here")
        assert result.returncode == 0, result.stderr
        readings[mode] = [int(value) for value in result.stdout.split()]
    mapped, _heap_during, _heap_after = readings["default"]
    assert mapped >= 24 << 20, readings  # the problem: glibc's default maps it
    mapped, heap_during, heap_after = readings["reuse"]
    assert mapped < 1 << 20, readings  # from the heap instead
    assert heap_after >= heap_during >= 24 << 20, readings  # and kept there after free


def test_cpu_bf16_autocast_keeps_the_residual_stream_in_bf16(tiny_base):
    """The encoder layers see bf16 hidden states under CPU bf16 autocast (no fp32 <-> bf16 casts between
    layers), the loss stays near fp32's, and without autocast nothing changes."""
    stock, patched = load_mlm_model(tiny_base).eval(), load_mlm_model(tiny_base).eval()
    keep_cpu_activations_in_bf16(patched)
    layer_input_dtypes = []
    patched.base_model.encoder.layer[0].register_forward_hook(
        lambda _module, inputs, _output: layer_input_dtypes.append(inputs[0].dtype))
    torch.manual_seed(0)
    input_ids = torch.randint(1000, 8000, (3, 24))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    labels[:, 2:6] = input_ids[:, 2:6]
    with torch.no_grad():
        fp32_loss = masked_lm_loss(stock, input_ids, attention_mask, labels)[0]
        assert torch.equal(masked_lm_loss(patched, input_ids, attention_mask, labels)[0], fp32_loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = masked_lm_loss(patched, input_ids, attention_mask, labels)[0]
    assert layer_input_dtypes == [torch.float32, torch.bfloat16]
    assert float(bf16_loss) == pytest.approx(float(fp32_loss), rel=1e-2)


def test_bf16_stream_trains_every_layer_with_fp32_gradients(tiny_base):
    model = load_mlm_model(tiny_base).train()
    keep_cpu_activations_in_bf16(model)
    outputs = []
    for layer in model.base_model.encoder.layer:
        layer.register_forward_hook(lambda _module, _inputs, output: outputs.append(
            (output[0] if isinstance(output, tuple) else output).dtype))
    input_ids = torch.randint(1000, 8000, (2, 16))
    labels = torch.full_like(input_ids, -100)
    labels[:, 3:7] = input_ids[:, 3:7]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _correct, count = masked_lm_loss(model, input_ids, torch.ones_like(input_ids), labels)
    (loss_sum / count).backward()
    assert outputs == [torch.bfloat16] * len(model.base_model.encoder.layer)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
        if parameter.grad is not None:
            assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), name
    assert model.base_model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_tune_cpu_training_swaps_dropout_unless_compiled(tiny_base):
    tuned, compiled = load_mlm_model(tiny_base), load_mlm_model(tiny_base)
    tune_cpu_training(tuned)
    tune_cpu_training(compiled, compiled=True)
    assert any(isinstance(module, FastDropout) for module in tuned.modules())
    assert not any(isinstance(module, FastDropout) for module in compiled.modules())
    assert tuned.base_model.embeddings._forward_hooks and not compiled.base_model.embeddings._forward_hooks
