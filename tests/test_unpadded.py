"""The unpadded encoder path gives the padded path's logits and gradients (CPU reference kernel; CUDA flash on GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from cpt.model import load_mlm_model, masked_lm_logits, masked_lm_loss
from cpt.unpadded import flash_varlen_attention, reference_varlen_attention, supports_unpadding


def ragged_batch(generator: torch.Generator):
    input_ids = torch.randint(1000, 5000, (3, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0
    attention_mask[2, 9:] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.where((torch.rand(input_ids.shape, generator=generator) < 0.3) & (attention_mask == 1), input_ids, -100)
    return input_ids, attention_mask, labels


@pytest.fixture
def no_dropout_base(tiny_base):
    config = json.loads((tiny_base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tiny_base / "config.json").write_text(json.dumps(config))
    return tiny_base


def test_unpadded_logits_equal_padded(tiny_base):
    model = load_mlm_model(tiny_base).eval()
    assert supports_unpadding(model)
    input_ids, attention_mask, labels = ragged_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        padded, padded_targets = masked_lm_logits(model, input_ids, attention_mask, labels)
        unpadded, unpadded_targets = masked_lm_logits(model, input_ids, attention_mask, labels, unpad=True)
    assert torch.equal(padded_targets, unpadded_targets)
    assert torch.allclose(padded, unpadded, atol=1e-5)


def test_unpadded_gradients_equal_padded(no_dropout_base):
    input_ids, attention_mask, labels = ragged_batch(torch.Generator().manual_seed(2))
    grads = []
    for unpad in (False, True):
        model = load_mlm_model(no_dropout_base).train()
        loss_sum, _correct, _count = masked_lm_loss(model, input_ids, attention_mask, labels, unpad=unpad)
        loss_sum.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_unpadded_with_gradient_checkpointing(no_dropout_base, monkeypatch):
    input_ids, attention_mask, labels = ragged_batch(torch.Generator().manual_seed(3))
    model = load_mlm_model(no_dropout_base).train()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    loss_sum, _correct, count = masked_lm_loss(model, input_ids, attention_mask, labels, unpad=True)
    loss_sum.backward()
    assert len(calls) == len(model.bert.encoder.layer), "every layer is recomputed in backward"
    assert count.item() > 0 and model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash varlen attention)")
def test_flash_varlen_matches_reference_on_cuda():
    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([7, 64, 1, 33], device="cuda")
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
    q, k, v = (torch.randn(int(lengths.sum()), 4, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    got = flash_varlen_attention(q, k, v, cu, 64).float()
    want = reference_varlen_attention(q.float(), k.float(), v.float(), cu, 64)
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2)
