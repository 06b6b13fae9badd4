"""Data order and batch building: epochs are permutations, the order is drawn once per epoch,
special tokens are never masked, loader processes hand out the batches of the in-line path in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepare_and_tokenize

from cpt.common.base_model import load_tokenizer
from cpt.data.shards import ShardSet
from cpt.training.batches import (
    BatchFeed,
    SamplerState,
    StepBatching,
    build_batch,
    epoch_permutation,
    masking_spec_for,
    next_global_batch,
)
from cpt.training.model import IGNORE_INDEX


def test_each_epoch_hands_out_every_sequence_once_across_batch_boundaries():
    state, picks = SamplerState(), []
    for _ in range(7):  # 7 x 30 = 210 picks over 100 sequences: two whole epochs and a part
        batch, state = next_global_batch(state, num_sequences=100, count=30, seed=3)
        assert len(batch) == 30
        picks.extend(batch)
    for epoch in (0, 1):
        assert sorted(index for e, index in picks if e == epoch) == list(range(100))
    assert state == SamplerState(epoch=2, position=10)
    first_epoch = [index for e, index in picks if e == 0]
    second_epoch = [index for e, index in picks if e == 1]
    assert first_epoch != second_epoch, "each epoch must have its own order"


def test_the_order_is_drawn_once_per_epoch_not_once_per_step():
    epoch_permutation.cache_clear()
    state = SamplerState()
    for _ in range(50):
        _picks, state = next_global_batch(state, num_sequences=200_000, count=256, seed=0)
    assert epoch_permutation.cache_info().misses == 1
    order = epoch_permutation(200_000, 0, 0)
    assert not order.flags.writeable, "a cached order must not be changed in place by a caller"
    assert np.array_equal(order, np.random.default_rng([0, 0, 0x5EED]).permutation(200_000)), \
        "the order changed: resumed runs would see other batches than the run they resume"


@pytest.fixture
def shards(tmp_path, tiny_base, small_corpus) -> ShardSet:
    run_dir = tmp_path / "run"
    prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    return ShardSet(Path(run_dir) / "shards", "train")


@pytest.mark.parametrize("mode", ["wwm+span", "token"])
def test_special_tokens_are_never_masked_or_labelled(shards, tiny_base, mode):
    spec = masking_spec_for(load_tokenizer(tiny_base), mode, mask_prob=0.9, span_p=0.2, span_max_words=10)
    assert np.flatnonzero(spec.is_special_id).tolist() == spec.special_ids.tolist()
    picks = [(0, index) for index in range(min(len(shards), 64))]
    batch = build_batch(shards, picks, spec, seed=1)
    for row, (_epoch, index) in enumerate(picks):
        ids, _starts = shards.sequence(index)
        labels = batch["labels"][row, : len(ids)].numpy()
        special = np.isin(ids, spec.special_ids)
        assert special.any(), "every sequence holds [CLS]/[SEP]"
        assert (labels[special] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, : len(ids)].numpy()[special] == ids[special]).all()
        assert (labels[~special] != IGNORE_INDEX).any()


def _batching(shards: ShardSet, tiny_base: Path, **overrides) -> StepBatching:
    spec = masking_spec_for(load_tokenizer(tiny_base), "wwm+span", mask_prob=0.15, span_p=0.2, span_max_words=10)
    settings = dict(shards_dir=shards.split_dir.parent, spec=spec, seed=3, global_batch_size=8, micro_batch_size=4,
                    seq_length=64)
    return StepBatching(**{**settings, **overrides})


def test_loader_processes_hand_out_the_in_line_batches_in_order(shards, tiny_base):
    import pickle

    batching = _batching(shards, tiny_base)
    assert len(pickle.dumps(batching)) < 1_000_000, "the memory-mapped shards must not travel to the workers"
    with BatchFeed(batching, SamplerState(epoch=1, position=16), workers=0, steps=5) as in_line:
        want = [in_line.next_step() for _ in range(5)]
    with BatchFeed(batching, SamplerState(epoch=1, position=16), workers=2, steps=5) as ahead:
        got = [ahead.next_step() for _ in range(5)]
        with pytest.raises(StopIteration):
            ahead.next_step()  # 5 steps asked for, 5 built
    assert [sampler for _, sampler in got] == [sampler for _, sampler in want]
    assert want[0][1] == SamplerState(epoch=1, position=24)
    for (want_batches, _), (got_batches, _) in zip(want, got, strict=True):
        assert len(want_batches) == len(got_batches) == 2  # 8 sequences in micro-batches of 4
        for want_batch, got_batch in zip(want_batches, got_batches, strict=True):
            assert all(torch.equal(want_batch[key], got_batch[key]) for key in want_batch)
    assert ahead.wait_s >= 0 and in_line.wait_s > 0


def test_a_rank_builds_only_its_share(shards, tiny_base):
    whole, _ = _batching(shards, tiny_base).build(SamplerState())
    halves = [_batching(shards, tiny_base, rank=rank, world_size=2).build(SamplerState())[0] for rank in (0, 1)]
    rows = lambda batches: sorted(map(tuple, torch.cat([b["labels"][:, :8] for b in batches]).tolist()))  # noqa: E731
    assert sum(len(half) for half in halves) == 2 and rows(halves[0] + halves[1]) == rows(whole)


def test_stopping_early_ends_the_loader_processes(shards, tiny_base):
    import multiprocessing

    with BatchFeed(_batching(shards, tiny_base), SamplerState(), workers=2, steps=1000) as feed:
        feed.next_step()
        assert multiprocessing.active_children(), "the loader processes should be running"
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_the_process_group_does_not_kill_the_loaders(shards, tiny_base, stop_signal):
    """Ctrl-C reaches every process of the terminal's group, torchrun's SIGTERM every process of a rank's
    group; the trainer handles it (checkpoint, exit 4), so the loaders must keep serving the step it
    finishes. Run in a fresh process (its own group): the first spawn there starts Python's resource
    tracker, which once undid the block."""
    import subprocess
    import sys

    script = f"""
import os, signal, sys
from pathlib import Path
from cpt.common.base_model import load_tokenizer
from cpt.training.batches import BatchFeed, SamplerState, StepBatching, masking_spec_for
from cpt.training.monitor import StopSignal

if __name__ == "__main__":
    spec = masking_spec_for(load_tokenizer(Path({str(tiny_base)!r})), "wwm+span", 0.15, 0.2, 10)
    batching = StepBatching(shards_dir=Path({str(shards.split_dir.parent)!r}), spec=spec, seed=3,
                            global_batch_size=8, micro_batch_size=4, seq_length=64)
    with BatchFeed(batching, SamplerState(), workers=0, steps=6) as in_line:
        want = [in_line.next_step()[1] for _ in range(6)]
    with StopSignal() as stop, BatchFeed(batching, SamplerState(), workers=2, steps=6) as feed:
        got = [feed.next_step()[1]]
        os.killpg(os.getpgid(0), signal.{stop_signal})
        got += [feed.next_step()[1] for _ in range(5)]
    assert stop.requested and got == want, (stop.requested, got, want)
    print("served every step")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            start_new_session=True)
    assert result.returncode == 0 and "served every step" in result.stdout, result.stderr[-2000:]


def test_packed_micro_batches_cross_as_one_tensor_per_key_and_come_back_equal(shards, tiny_base):
    from cpt.training.batches import pack_batches, unpack_batches

    batches, _ = _batching(shards, tiny_base, global_batch_size=24, micro_batch_size=4).build(SamplerState())
    packed = pack_batches(batches)
    assert sorted(packed) == ["attention_mask", "input_ids", "labels"]
    assert all(flat.dim() == 1 for flat, _shapes in packed.values())
    unpacked = unpack_batches(packed)
    assert len(unpacked) == len(batches) == 6
    for want, got in zip(batches, unpacked, strict=True):
        assert all(torch.equal(want[key], got[key]) for key in want)


def test_ranks_are_dealt_similar_token_counts():
    """Equal sequence counts, token counts within one sequence's length (the longest) of each other, and a pure
    function of the lengths (every rank and every resumed run deals the same)."""
    from cpt.training.batches import deal_to_ranks

    rng = np.random.default_rng(0)
    for world_size, count in ((2, 8), (4, 64), (8, 256), (3, 30)):
        for _ in range(20):
            lengths = sorted(rng.integers(1, 513, count).tolist())  # the length-sorted global batch
            shares = deal_to_ranks(lengths, world_size)
            assert sorted(sum(shares, [])) == list(range(count))
            assert {len(share) for share in shares} == {count // world_size}
            tokens = [sum(lengths[i] for i in share) for share in shares]
            assert max(tokens) - min(tokens) <= max(lengths), (tokens, lengths)
            assert shares == deal_to_ranks(list(lengths), world_size)
    # The contiguous split this replaces: the last rank took the longest sequences.
    lengths = [8] * 4 + [512] * 4
    assert [sum(lengths[i] for i in share) for share in deal_to_ranks(lengths, 2)] == [1040, 1040]
    assert deal_to_ranks(list(range(1, 7)), 1) == [list(range(6))]


def test_ranks_build_balanced_shares_of_the_global_batch(shards, tiny_base):
    """Two ranks' shares of real steps: together the global batch, token counts close, each in length order."""
    for step_start in (SamplerState(), SamplerState(epoch=0, position=16)):
        whole, _ = _batching(shards, tiny_base, global_batch_size=16).build(step_start)
        halves = [_batching(shards, tiny_base, rank=rank, world_size=2, global_batch_size=16).build(step_start)[0]
                  for rank in (0, 1)]
        tokens = [sum(int(b["attention_mask"].sum()) for b in half) for half in halves]
        assert sum(tokens) == sum(int(b["attention_mask"].sum()) for b in whole)
        assert abs(tokens[0] - tokens[1]) <= 64, tokens
        for half in halves:
            lengths = torch.cat([b["attention_mask"].sum(dim=1) for b in half]).tolist()
            assert lengths == sorted(lengths)


def test_loader_builds_the_unpadding_metadata_with_unchanged_batches(shards, tiny_base):
    """StepBatching(with_unpadding_metadata=True): the same input_ids/attention_mask/labels, plus the index tensors
    of cpt.training.unpadded.unpadding_metadata, and they survive the trip from the loader processes."""
    from cpt.training.batches import pack_batches, unpack_batches
    from cpt.training.unpadded import METADATA_KEYS, unpadding_metadata

    plain, _ = _batching(shards, tiny_base).build(SamplerState())
    with_metadata, _ = _batching(shards, tiny_base, with_unpadding_metadata=True).build(SamplerState())
    assert set(with_metadata[0]) == {"input_ids", "attention_mask", "labels", *METADATA_KEYS}
    for want, got in zip(plain, unpack_batches(pack_batches(with_metadata)), strict=True):
        assert all(torch.equal(want[key], got[key]) for key in want)
        recomputed = unpadding_metadata(got["attention_mask"], got["labels"])
        assert all(torch.equal(recomputed[key], got[key]) and recomputed[key].dtype == got[key].dtype
                   for key in METADATA_KEYS)
