"""The guard of the unpadded fast path (cpt/training/fastpath_check.py): a correct kernel passes, a faulty or failing
one is caught and training falls back to the padded path, and the check changes nothing a run computes.
On CPU the faults are injected as varlen kernels; on CUDA the last test checks the real flash kernel."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import prepare_and_tokenize, ragged_lm_batch

from cpt.config import TrainConfig
from cpt.training.fastpath_check import TOLERANCES, PathComparison, check_batch, compare_paths
from cpt.training.loop import train
from cpt.training.model import load_mlm_model
from cpt.training.unpadded import reference_varlen_attention


def across_sequences(query, key, value, cu_seqlens, max_len, dropout_p=0.0):
    """A plausible kernel bug: cu_seqlens ignored, every token attends to the whole micro-batch."""
    tokens = query.shape[0]
    return reference_varlen_attention(query, key, value, torch.tensor([0, tokens]), tokens)


def wrong_scale(query, key, value, cu_seqlens, max_len, dropout_p=0.0):
    """Another: softmax scale applied twice over (scores x 2). The logits barely move; dq/dk do."""
    return reference_varlen_attention(query * 2, key, value, cu_seqlens, max_len)


def failing(query, key, value, cu_seqlens, max_len, dropout_p=0.0):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reference_kernel_passes(tiny_base, precision):
    model = load_mlm_model(tiny_base)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None
    comparison = compare_paths(model, ragged_lm_batch(), autocast, reference_varlen_attention)
    assert comparison.failures(precision) == [], comparison.summary()
    assert comparison.masked > 0 and set(comparison.grads_rel) >= {"layer0.query", "layer0.key", "layer0.value"}


@pytest.mark.parametrize("kernel", [across_sequences, wrong_scale])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_faulty_kernel_is_caught(tiny_base, kernel, precision):
    model = load_mlm_model(tiny_base)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None
    comparison = compare_paths(model, ragged_lm_batch(), autocast, kernel)
    failures = comparison.failures(precision)
    assert any(failure.startswith("grad layer0.query") for failure in failures), comparison.summary()


@pytest.mark.parametrize("kernel", [reference_varlen_attention, across_sequences])
def test_the_check_runs_the_loader_metadata_path_training_takes(tiny_base, kernel):
    """Training batches carry the loader's unpadding metadata; a batch with it is checked on that path, with the
    same verdicts (the reference kernel passes, a faulty one is caught)."""
    from cpt.training.unpadded import unpadding_metadata

    model = load_mlm_model(tiny_base)
    batch = ragged_lm_batch()
    with_metadata = {**batch, **unpadding_metadata(batch["attention_mask"], batch["labels"])}
    comparison = compare_paths(model, with_metadata, None, kernel)
    assert comparison.masked > 0
    caught = any(failure.startswith("grad layer0.query") for failure in comparison.failures("fp32"))
    assert caught == (kernel is across_sequences), comparison.summary()


def test_the_check_uses_the_batch_metadata(tiny_base):
    """Metadata whose unpadded-side index is wrong (masked rows out of order) must fail the check: proof that the
    unpadded side runs on the metadata it is given, not on indices of its own."""
    from cpt.training.unpadded import unpadding_metadata

    batch = ragged_lm_batch()
    metadata = unpadding_metadata(batch["attention_mask"], batch["labels"])
    metadata["masked_token_index"] = metadata["masked_token_index"].flip(0)
    comparison = compare_paths(load_mlm_model(tiny_base), {**batch, **metadata}, None, reference_varlen_attention)
    assert comparison.failures("fp32"), comparison.summary()


def test_failing_kernel_is_reported(tiny_base):
    comparison = compare_paths(load_mlm_model(tiny_base), ragged_lm_batch(), None, failing)
    assert comparison.error.startswith("RuntimeError: FlashAttention only supports Ampere")
    assert comparison.failures("bf16") == [f"the unpadded path raised {comparison.error}"]


def test_nan_fails_and_tolerances_loosen_with_precision():
    assert PathComparison(loss_rel=float("nan"), logits_rel=0.0).failures("fp32")
    assert TOLERANCES["fp32"]["grads"] < TOLERANCES["fp16"]["grads"] < TOLERANCES["bf16"]["grads"]


def test_check_leaves_model_grads_and_generators_as_they_were(tiny_base):
    model = load_mlm_model(tiny_base).train()
    torch.manual_seed(123)
    cpu_state = torch.get_rng_state()
    compare_paths(model, ragged_lm_batch(), None, across_sequences)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert model.training and all(parameter.grad is None for parameter in model.parameters())


@pytest.fixture
def tokenized_run(tmp_path, tiny_base, small_corpus):
    run_dir = tmp_path / "run"
    prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    return run_dir


def test_check_batch_spans_the_lengths_of_the_first_global_batch(tokenized_run, tiny_base):
    from cpt.common.base_model import load_tokenizer
    from cpt.data.shards import ShardSet
    from cpt.training.batches import masking_spec_for

    shards = ShardSet(tokenized_run / "shards", "train")
    spec = masking_spec_for(load_tokenizer(tiny_base), "wwm+span", 0.15, 0.2, 10)
    batch = check_batch(shards, spec, seed=7, seq_length=64, global_batch_size=32, sequences=8)
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[0] == 8 and torch.equal(lengths, lengths.sort().values)
    assert (batch["labels"] != -100).any() and int(lengths.max()) <= 64


def _train_weights(run_dir, base, **overrides):
    from cpt.common.weights import read_state_dict
    from cpt.training import checkpoint as ckpt

    settings = dict(output=run_dir, base_model=base, micro_batch_size=4, global_batch_size=8, max_steps=2, lr=1e-3,
                    warmup_steps=0, eval_interval=2, save_interval=2, eval_max_sequences=8, seed=7, precision="fp32")
    settings.update(overrides)
    train(TrainConfig(**settings))
    return read_state_dict(ckpt.step_dir(run_dir, 2) / "model.safetensors")


@pytest.mark.slow
def test_guard_falls_back_to_the_padded_path_and_keeps_the_run_identical(tokenized_run, tiny_base, tmp_path,
                                                                          monkeypatch):
    """On CPU the guard is made to run (as on CUDA) with a faulty kernel: one warning, and the run trains exactly
    the weights of a --unpad off run (so neither the check nor the fallback moved any random stream)."""
    for name in ("padded", "guarded", "unguarded", "checked"):
        shutil.copytree(tokenized_run, tmp_path / name)
    padded = _train_weights(tmp_path / "padded", tiny_base, unpad="off")
    unguarded = _train_weights(tmp_path / "unguarded", tiny_base, unpad="on")

    warnings, infos = [], []
    monkeypatch.setattr("cpt.training.fastpath_check.should_check", lambda device: True)
    monkeypatch.setattr("cpt.training.fastpath_check.warn", warnings.append)
    monkeypatch.setattr("cpt.training.fastpath_check.info", infos.append)
    with monkeypatch.context() as patch:
        patch.setattr("cpt.training.unpadded.pick_attention", lambda device: across_sequences)
        guarded = _train_weights(tmp_path / "guarded", tiny_base, unpad="on")
    assert len(warnings) == 1 and "training on the padded SDPA path instead" in warnings[0], warnings
    assert "grad layer0.query rel. error" in warnings[0]
    for name in padded:
        assert torch.equal(padded[name], guarded[name]), name

    checked = _train_weights(tmp_path / "checked", tiny_base, unpad="on")  # the reference kernel: passes
    assert len(warnings) == 1 and any("unpadded path checked against the padded SDPA path" in line for line in infos)
    for name in unguarded:
        assert torch.equal(unguarded[name], checked[name]), name
    assert json.loads((tmp_path / "checked" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the flash varlen kernel the guard checks)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_flash_path_passes_the_guard_on_cuda(precision):
    """The real self-check: 16 heads, lengths around the kernel's block edges, flash against padded SDPA."""
    from test_unpadded import CUDA_LENGTHS, bert_16_heads

    model = bert_16_heads("cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    comparison = compare_paths(model, ragged_lm_batch(lengths=CUDA_LENGTHS, device="cuda"),
                               torch.autocast("cuda", dtype=dtype))
    print(f"guard on CUDA ({precision}): {json.dumps(comparison.as_dict())}")
    assert comparison.failures(precision) == [], comparison.summary()
