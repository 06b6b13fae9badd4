"""Tests for cpt.training.mlm_loss: the one-pass loss equals F.cross_entropy + argmax in value, gradient and count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpt.training.mlm_loss import summed_cross_entropy


def reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    as_fp32 = logits.float()
    return F.cross_entropy(as_fp32, targets, reduction="sum"), (as_fp32.argmax(dim=-1) == targets).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_gradient_and_count_equal_cross_entropy_and_argmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(70, 3001) * 4).to(dtype)
    targets = torch.randint(0, 3001, (70,))
    targets[:20] = logits[:20].float().argmax(dim=-1)  # some rows predicted right
    mine = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss_sum, correct = summed_cross_entropy(mine, targets)
    expected_loss, expected_correct = reference(theirs, targets)
    torch.testing.assert_close(loss_sum, expected_loss, rtol=1e-6, atol=1e-4)
    assert loss_sum.dtype == torch.float32
    assert int(correct) == int(expected_correct) >= 20
    (loss_sum * 0.37).backward()
    (expected_loss * 0.37).backward()
    assert mine.grad.dtype == dtype
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(mine.grad, theirs.grad, **tolerance)
    torch.testing.assert_close(logits, mine.detach())  # the input is left as it was


def test_ties_count_as_argmax_does_first_index_wins():
    logits = torch.zeros(4, 6)
    logits[0, [1, 4]] = 5.0  # target 1 is the first maximum: correct
    logits[1, [1, 4]] = 5.0  # target 4 ties with an earlier index: argmax says 1, wrong
    logits[2, 3] = 5.0  # unique maximum at the target: correct
    logits[3, 2] = 5.0  # unique maximum elsewhere: wrong
    targets = torch.tensor([1, 4, 3, 0])
    assert int(summed_cross_entropy(logits, targets)[1]) == int(reference(logits, targets)[1]) == 2


def test_without_gradient_and_on_no_rows():
    logits, targets = torch.randn(5, 11), torch.randint(0, 11, (5,))
    with torch.no_grad():
        loss_sum, correct = summed_cross_entropy(logits, targets)
    torch.testing.assert_close(loss_sum, reference(logits, targets)[0])
    empty = torch.zeros(0, 11, requires_grad=True)
    loss_sum, correct = summed_cross_entropy(empty, torch.zeros(0, dtype=torch.long))
    assert float(loss_sum.detach()) == 0.0 and int(correct) == 0
    loss_sum.backward()
    assert empty.grad.shape == (0, 11)


def test_padding_rows_get_no_loss_and_a_zero_gradient():
    torch.manual_seed(1)
    padded = torch.randn(8, 13, requires_grad=True)
    targets = torch.randint(0, 13, (5,))
    loss_sum, correct = summed_cross_entropy(padded, targets)
    expected_loss, expected_correct = reference(padded[:5], targets)
    torch.testing.assert_close(loss_sum, expected_loss)
    assert int(correct) == int(expected_correct)
    loss_sum.backward()
    assert torch.all(padded.grad[5:] == 0)
    sliced = padded.detach()[:5].clone().requires_grad_()
    reference(sliced, targets)[0].backward()
    torch.testing.assert_close(padded.grad[:5], sliced.grad)


def test_bf16_gradient_takes_the_incoming_scale_in_fp32():
    """The scale (1 / masked tokens of the global batch) must not be rounded to bf16 before it multiplies."""
    torch.manual_seed(2)
    logits = torch.randn(3, 7).bfloat16().requires_grad_()
    targets = torch.tensor([0, 3, 6])
    scale = (1 + 1 / 256) / 1024  # halfway between two bf16 values: rounding it first moves every step by 0.4 %
    (summed_cross_entropy(logits, targets)[0] * scale).backward()
    unscaled = logits.detach().clone().requires_grad_()
    summed_cross_entropy(unscaled, targets)[0].backward()
    torch.testing.assert_close(logits.grad, (unscaled.grad.float() * scale).bfloat16(), rtol=0, atol=0)


def test_non_finite_rows_count_as_argmax_does_and_large_logits_keep_precision():
    logits = torch.zeros(3, 5)
    logits[0, 2] = float("nan")  # argmax picks the NaN
    logits[1, 4] = float("inf")
    logits[2] = float("-inf")  # all -inf: argmax says 0
    targets = torch.tensor([2, 4, 0])
    assert int(summed_cross_entropy(logits, targets)[1]) == int(reference(logits, targets)[1]) == 3
    big = torch.randn(16, 400) + 1e4  # fp32 spacing at 1e4 is 1e-3: adding the maximum back would round to it
    targets = torch.randint(0, 400, (16,))
    torch.testing.assert_close(summed_cross_entropy(big, targets)[0].double(),
                               F.cross_entropy(big.double(), targets, reduction="sum"), rtol=1e-6, atol=1e-4)


def test_no_gradient_is_kept_outside_autograd():
    logits = torch.randn(6, 9, requires_grad=True)
    with torch.no_grad():
        loss_sum, _correct = summed_cross_entropy(logits, torch.randint(0, 9, (6,)))
    assert loss_sum.grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keeps_cross_entropy_and_its_scaling():
    logits = (torch.randn(70, 3001, device="cuda") * 4).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 3001, (70,), device="cuda")
    loss_sum, correct = summed_cross_entropy(logits, targets)
    expected_loss, expected_correct = reference(logits.detach(), targets)
    torch.testing.assert_close(loss_sum.detach(), expected_loss, rtol=1e-5, atol=1e-3)
    assert int(correct) == int(expected_correct)
    (loss_sum * ((1 + 1 / 256) / 1024)).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()
