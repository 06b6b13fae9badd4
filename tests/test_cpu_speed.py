"""Tests for cpt.cpu_speed: the CPU training knobs do what they claim and change no result they should not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cpt.cpu_speed import keep_cpu_activations_in_bf16, tune_cpu_training
from cpt.fast_dropout import FastDropout
from cpt.model import load_mlm_model, masked_lm_loss

STEP_FAULTS = """
import resource, sys, torch
from cpt.cpu_speed import reuse_freed_memory
from cpt.model import load_mlm_model, masked_lm_loss
torch.set_num_threads(1)
if sys.argv[2] == "reuse" and not reuse_freed_memory():
    sys.exit(99)
model = load_mlm_model(sys.argv[1]).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
input_ids = torch.randint(1000, 8000, (16, 128), generator=torch.Generator().manual_seed(0))
labels = torch.full_like(input_ids, -100)
labels[:, 1:20] = input_ids[:, 1:20]
for step in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss_sum, _correct, count = masked_lm_loss(model, input_ids, torch.ones_like(input_ids), labels)
    (loss_sum / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_training_steps_reuse_freed_memory_instead_of_page_faulting(tiny_base):
    """Training steps of the tiny BERT under glibc's defaults page-fault again and again (freed blocks
    unmapped or trimmed, then faulted in again): 36k-158k minor faults over steps 6-20 in four runs
    here. With reuse_freed_memory: 5-6,400 (near none once warm)."""
    if os.environ.get("LD_PRELOAD") or any(name.startswith("MALLOC_") for name in os.environ):
        pytest.skip("another allocator or glibc malloc settings from the environment")
    faults = {}
    for mode in ("default", "reuse"):
        result = subprocess.run([sys.executable, "-c", STEP_FAULTS, str(tiny_base), mode], capture_output=True,
                                text=True, timeout=120)
        if result.returncode == 99:
            pytest.skip("no glibc mallopt here")
        assert result.returncode == 0, result.stderr
        faults[mode] = sum(int(line) for line in result.stdout.split()[5:])  # steps 6-20: warm
    assert faults["default"] > 3 * faults["reuse"] + 10_000, faults


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
