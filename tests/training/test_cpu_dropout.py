"""Tests for the cheap dropout of cpt.training.cpu: the cheap CPU dropout is nn.Dropout in distribution and in behaviour,
and a model using it computes what the stock model computes whenever dropout is off."""

from __future__ import annotations

import pytest
import torch

from cpt.training.cpu import (
    FastDropout,
    attention_with_dropout,
    fast_dropout,
    keep_probability,
    mask_from_bits,
    random_bits,
    use_fast_dropout,
)
from cpt.training.model import load_mlm_model, masked_lm_loss


def test_mask_drops_p_of_the_elements_independently():
    torch.manual_seed(0)
    keep = mask_from_bits(random_bits(torch.Size((1000, 1001)), torch.device("cpu")), 0.1, torch.float32)  # odd count
    keep_prob = keep_probability(0.1)
    assert keep.shape == (1000, 1001) and keep.dtype == torch.float32
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert keep_prob == pytest.approx(1 - 6554 / 65536)
    dropped = 1 - keep
    assert dropped.mean().item() == pytest.approx(0.1, abs=0.002)
    # the four 16-bit fields of one random word are independent: neighbours co-drop at p^2
    assert (dropped[:, :-1] * dropped[:, 1:]).mean().item() == pytest.approx(0.01, abs=0.001)


def test_fast_dropout_scales_kept_values_and_routes_gradients_through_them():
    torch.manual_seed(1)
    inputs = torch.randn(64, 257, requires_grad=True)
    out = fast_dropout(inputs, 0.25)
    kept = out != 0
    scale = 1 / (1 - round(0.25 * 65536) / 65536)
    torch.testing.assert_close(out[kept], inputs[kept] * scale)
    out.sum().backward()
    torch.testing.assert_close(inputs.grad, kept.float() * scale)
    assert fast_dropout(inputs, 0.25, training=False) is inputs
    assert fast_dropout(inputs, 0.0) is inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dropout_scales_in_fp32_without_bias(dtype):
    """1/0.9 rounds to 1.109 in bf16; the scale must not: kept values equal fp32 x * scale, rounded once."""
    torch.manual_seed(3)
    inputs = torch.randn(128, 513).to(dtype).requires_grad_()
    out = fast_dropout(inputs, 0.1)
    assert out.dtype == dtype
    kept = out != 0
    scale = 1 / (1 - round(0.1 * 65536) / 65536)
    torch.testing.assert_close(out[kept], (inputs[kept].float() * scale).to(dtype), rtol=0, atol=0)
    out.float().sum().backward()
    assert inputs.grad.dtype == dtype
    torch.testing.assert_close(inputs.grad[kept].float(), torch.full((int(kept.sum()),), scale).to(dtype).float(),
                               rtol=0, atol=0)
    assert torch.all(inputs.grad[~kept] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_two_bytes_an_element(dtype):
    """fp32 keeps the int16 random bits (its 0/1 mask would take 4 bytes); bf16 keeps its mask."""
    saved = []
    inputs = torch.randn(40, 50, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        out = fast_dropout(inputs, 0.3)
    assert [(tensor.dtype, tuple(tensor.shape)) for tensor in saved] == [
        (torch.int16 if dtype == torch.float32 else dtype, (40, 50))]
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(inputs.grad, (out != 0).to(dtype) * (1 / (1 - round(0.3 * 65536) / 65536)))


def test_fast_dropout_follows_the_seed():
    first = (torch.manual_seed(7), fast_dropout(torch.ones(1000), 0.5))[1]
    second = (torch.manual_seed(7), fast_dropout(torch.ones(1000), 0.5))[1]
    torch.testing.assert_close(first, second)


def test_attention_without_dropout_equals_sdpa_with_dropout_the_mean():
    torch.manual_seed(2)
    query, key, value = (torch.randn(2, 4, 9, 8) for _ in range(3))
    keep_keys = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep_keys[1, ..., 6:] = False
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=keep_keys)
    torch.testing.assert_close(attention_with_dropout(query, key, value, keep_keys, 0.0), reference)
    mean = torch.stack([attention_with_dropout(query, key, value, keep_keys, 0.3) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, reference, atol=0.06, rtol=0)  # about 5 standard errors; seeded


def test_model_with_fast_dropout_matches_the_stock_model(tiny_base):
    """Same weights and state dict; eval logits equal; training loss equal once dropout is 0."""
    stock, fast = load_mlm_model(tiny_base), use_fast_dropout(load_mlm_model(tiny_base))
    assert not any(isinstance(module, torch.nn.Dropout) for module in fast.modules())
    assert any(isinstance(module, FastDropout) for module in fast.modules())
    assert stock.state_dict().keys() == fast.state_dict().keys()
    input_ids = torch.randint(1000, 8000, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 12:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[:, 3] = input_ids[:, 3]
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(input_ids, attention_mask=attention_mask).logits,
                                   stock.eval()(input_ids, attention_mask=attention_mask).logits)
    for model in (stock, fast):
        for module in model.modules():
            if hasattr(module, "p"):
                module.p = 0.0
        model.config.attention_probs_dropout_prob = 0.0
    losses = [masked_lm_loss(model.train(), input_ids, attention_mask, labels)[0] for model in (stock, fast)]
    torch.testing.assert_close(losses[0], losses[1])


def test_p_one_drops_everything_like_nn_dropout():
    inputs = torch.randn(5, 7, requires_grad=True)
    out = fast_dropout(inputs, 1.0)
    assert torch.equal(out, torch.zeros_like(inputs))
    out.sum().backward()
    assert torch.equal(inputs.grad, torch.zeros_like(inputs))


def test_attention_scores_stay_fp32_under_bf16_autocast():
    """SDPA's math path upcasts on CPU; rounding the scores to bf16 doubled the error, so cpt upcasts too."""
    torch.manual_seed(3)
    query, key, value = (torch.randn(2, 4, 256, 64).bfloat16() * 2 for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_with_dropout(query, key, value, None, 1e-9)  # p rounds to 0 of 65536: keeps everything
    assert out.dtype == torch.bfloat16
    error = (out.float() - reference).abs()
    assert error.max().item() < 0.03 and error.mean().item() < 0.003  # bf16 scores: 0.08 and 0.0077
