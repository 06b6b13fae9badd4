"""The unpadded encoder path gives the padded path's logits and gradients (CPU reference kernel; CUDA flash on GPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ragged_lm_batch

from cpt.training.model import load_mlm_model, masked_lm_logits, masked_lm_loss
from cpt.training.unpadded import flash_varlen_attention, reference_varlen_attention, supports_unpadding


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


CUDA_LENGTHS = (1, 127, 128, 129, 300, 512)  # around flash's 128-row blocks, and the full 512


def bert_16_heads(device: str) -> torch.nn.Module:
    """A 2-layer BERT with BERT-large's 16 heads of 64 dims (hidden 1024), 512 positions, SDPA attention."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=6000, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=512, attn_implementation="sdpa")
    return BertForMaskedLM(config).to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash varlen attention)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_unpadded_matches_padded_forward_and_backward_on_cuda(dtype):
    """Padded SDPA vs unpadded flash, 16 heads, lengths 1..512: loss, masked logits and every parameter's
    gradient (dq/dk/dv reach the Q/K/V weights) within half-precision tolerance."""
    model = bert_16_heads("cuda").eval()  # dropout off: the two paths compute the same function
    batch = ragged_lm_batch(seed=5, lengths=CUDA_LENGTHS, device="cuda", mask_share=0.15)
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    results = []
    for unpad in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            logits, targets = masked_lm_logits(model, input_ids, attention_mask, labels, unpad=unpad)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        loss.backward()
        results.append((loss.detach().float(), logits.detach().float(),
                        {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want_logits, want_grads), (got_loss, got_logits, got_grads) = results

    def relative(got, want):
        return float((got - want).norm() / want.norm().clamp(min=1e-12))

    assert relative(got_loss, want_loss) < 1e-2
    assert got_logits.shape == want_logits.shape and relative(got_logits, want_logits) < 3e-2
    assert want_grads.keys() == got_grads.keys()
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a constant per query): both are noise.
    errors = {name: relative(got_grads[name], want_grads[name]) for name in want_grads
              if not name.endswith("attention.self.key.bias")}
    print("worst gradient errors:", sorted(errors.items(), key=lambda item: -item[1])[:5])
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda item: -item[1])[:5]


def _model_with_attention_dropout(base, p: float):
    model = load_mlm_model(base)
    model.config.attention_probs_dropout_prob = p
    return model


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA facts as a test sets them (capability, name), on a machine without CUDA."""
    facts = {"capability": (9, 0), "name": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: facts["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: facts["name"])
    return facts


@pytest.mark.parametrize(("capability", "precision", "attention_dropout", "unpadded", "reason"), [
    ((9, 0), "bf16", 0.0, True, None),
    ((8, 0), "fp16", 0.0, True, None),
    ((9, 0), "fp32", 0.0, False, "takes only bf16/fp16, and the precision is fp32"),
    ((7, 5), "fp16", 0.0, False, "needs compute capability >= 8.0"),
    ((9, 0), "bf16", 0.1, False, "attention dropout 0.1 has no flash varlen kernel"),
])
def test_unpad_auto_only_where_flash_runs_the_same_model(tiny_base, fake_cuda, monkeypatch, capability, precision,
                                                         attention_dropout, unpadded, reason):
    from cpt.training.session import resolve_unpad

    fake_cuda["capability"] = capability
    logged = []
    monkeypatch.setattr("cpt.training.session.info", logged.append)
    model = _model_with_attention_dropout(tiny_base, attention_dropout)
    assert resolve_unpad("auto", model, torch.device("cuda", 0), precision) is unpadded
    assert len(logged) == 1 and logged[0].startswith("train: --unpad auto -> ")
    if unpadded:
        assert f"unpadded path (flash varlen attention, {precision})" in logged[0]
    else:
        assert "padded SDPA path" in logged[0] and reason in logged[0], logged


def test_unpad_auto_on_cpu_and_off(tiny_base, monkeypatch):
    from cpt.training.session import resolve_unpad

    logged = []
    monkeypatch.setattr("cpt.training.session.info", logged.append)
    model = _model_with_attention_dropout(tiny_base, 0.0)
    assert resolve_unpad("auto", model, torch.device("cpu"), "bf16") is False
    assert "padded SDPA path (no flash varlen attention on cpu)" in logged[0]
    assert resolve_unpad("off", model, torch.device("cpu"), "bf16") is False


def test_unpad_on_where_flash_cannot_run_on_cuda_is_a_clear_error(tiny_base, fake_cuda):
    from cpt.errors import BadInput
    from cpt.training.session import resolve_unpad

    with pytest.raises(BadInput, match="--unpad on: flash varlen attention takes only bf16/fp16.*--precision bf16"):
        resolve_unpad("on", _model_with_attention_dropout(tiny_base, 0.0), torch.device("cuda", 0), "fp32")
    fake_cuda["capability"] = (7, 0)
    with pytest.raises(BadInput, match="compute capability >= 8.0, and NVIDIA H100 80GB HBM3 has 7.0"):
        resolve_unpad("on", _model_with_attention_dropout(tiny_base, 0.0), torch.device("cuda", 0), "bf16")


def test_unpad_on_says_attention_dropout_is_left_out(tiny_base, monkeypatch):
    from cpt.training.session import resolve_unpad

    warned = []
    monkeypatch.setattr("cpt.training.session.warn", warned.append)
    monkeypatch.setattr("cpt.training.session.info", lambda message: None)
    assert resolve_unpad("on", _model_with_attention_dropout(tiny_base, 0.1), torch.device("cpu"), "fp32") is True
    assert len(warned) == 1 and "no attention-probability dropout on the unpadded path" in warned[0]


def test_unpadded_path_applies_no_attention_dropout_on_any_device(tiny_base):
    """Attention dropout is left out on the unpadded path on CPU too (the flash kernel has none), so one set of
    flags trains one model everywhere: with hidden dropout off, training-mode logits equal eval-mode logits even
    at attention dropout 0.5, while the padded path does apply it."""
    config = json.loads((tiny_base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    (tiny_base / "config.json").write_text(json.dumps(config))
    model = load_mlm_model(tiny_base)
    input_ids, attention_mask, labels = ragged_batch(torch.Generator().manual_seed(4))
    with torch.no_grad():
        evaluated = masked_lm_logits(model.eval(), input_ids, attention_mask, labels, unpad=True)[0]
        trained = masked_lm_logits(model.train(), input_ids, attention_mask, labels, unpad=True)[0]
        padded_trained = masked_lm_logits(model.train(), input_ids, attention_mask, labels, unpad=False)[0]
    assert torch.equal(evaluated, trained)
    assert not torch.allclose(evaluated, padded_trained, atol=1e-3)


def test_reference_kernel_takes_a_static_max_len():
    """The unpadded path may pass the sequence length as max_len (no device sync for the true maximum)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 9, 1])
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
    q, k, v = (torch.randn(int(lengths.sum()), 2, 8, generator=generator) for _ in range(3))
    assert torch.equal(reference_varlen_attention(q, k, v, cu, 9), reference_varlen_attention(q, k, v, cu, 512))


def test_unpadding_metadata_indexes_the_real_and_masked_tokens():
    from cpt.training.unpadded import unpadding_metadata

    input_ids, attention_mask, labels = ragged_batch(torch.Generator().manual_seed(6))
    metadata = unpadding_metadata(attention_mask, labels)
    keep = attention_mask.bool()
    assert metadata["cu_seqlens"].dtype == torch.int32 and metadata["cu_seqlens"].tolist() == [0, 24, 41, 50]
    assert torch.equal(input_ids.reshape(-1)[metadata["token_index"]], input_ids[keep])
    assert torch.equal(metadata["position_ids"], torch.arange(24).expand(3, 24)[keep])
    assert torch.equal(metadata["masked_labels"], labels[labels != -100])
    assert torch.equal(labels.reshape(-1)[metadata["masked_index"]], metadata["masked_labels"])
    assert torch.equal(labels[keep][metadata["masked_token_index"]], metadata["masked_labels"])


@pytest.mark.parametrize("unpad", [False, True])
def test_loader_metadata_gives_the_same_loss_and_gradients_bit_for_bit(no_dropout_base, unpad):
    """index_select with the loader's indices instead of boolean masks on the device: the same numbers exactly."""
    from cpt.training.unpadded import unpadding_metadata

    input_ids, attention_mask, labels = ragged_batch(torch.Generator().manual_seed(7))
    results = []
    for metadata in (None, unpadding_metadata(attention_mask, labels)):
        model = load_mlm_model(no_dropout_base).train()
        loss_sum, correct, count = masked_lm_loss(model, input_ids, attention_mask, labels, unpad=unpad,
                                                  metadata=metadata)
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, count,
                        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want_correct, want_count, want_grads), (got_loss, got_correct, got_count, got_grads) = results
    assert torch.equal(want_loss, got_loss) and torch.equal(want_correct, got_correct)
    assert got_count.dtype == torch.int64 and int(got_count) == int(want_count) == int((labels != -100).sum())
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        assert torch.equal(want_grads[name], got_grads[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash varlen attention)")
def test_unpadded_forward_with_loader_metadata_has_no_host_device_sync_on_cuda():
    """With the loader's metadata, the unpadded forward and loss never wait for the GPU (torch raises on any
    synchronizing call); the backward's syncs are counted and printed (embedding backward has one in torch)."""
    import warnings

    from cpt.training.unpadded import unpadding_metadata

    model = bert_16_heads("cuda").train()
    generator = torch.Generator().manual_seed(8)
    width = max(CUDA_LENGTHS)
    attention_mask = (torch.arange(width)[None] < torch.tensor(CUDA_LENGTHS)[:, None]).long()
    input_ids = torch.randint(1000, 5000, attention_mask.shape, generator=generator) * attention_mask
    labels = torch.where((torch.rand(input_ids.shape, generator=generator) < 0.15) & (attention_mask == 1),
                         input_ids, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             **unpadding_metadata(attention_mask, labels)}
    batch = {key: value.pin_memory().to("cuda", non_blocking=True) for key, value in batch.items()}
    torch.cuda.synchronize()
    metadata = {key: batch.pop(key) for key in list(batch) if key not in ("input_ids", "attention_mask", "labels")}
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm-up: lazy initialisations may sync
        warm_up = masked_lm_loss(model, **batch, unpad=True, metadata=metadata)[0]
    warm_up.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, _correct, _count = masked_lm_loss(model, **batch, unpad=True, metadata=metadata)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_sum.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"backward: {len(caught)} synchronizing call(s):", [str(w.message)[:120] for w in caught][:5])
