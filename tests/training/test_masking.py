"""Tests for cpt.training.masking: budget, 80/10/10, whole words, span lengths, determinism, batching.

Statistical checks run over many synthetic sequences ([CLS] words of 1-4 tokens [SEP] [PAD]...)
with fixed seeds, so they are deterministic; tolerances are several standard errors wide.
"""

from __future__ import annotations

import numpy as np
import pytest

from cpt.training.masking import (
    IGNORE_INDEX,
    MASKING_MODES,
    find_units,
    mask_batch,
    mask_sequence,
    masking_budget,
    sample_rng,
    sample_spans,
)

CLS_ID, SEP_ID, PAD_ID, MASK_ID = 101, 102, 0, 103
RANDOM_IDS = np.arange(1000, 5000)  # disjoint from content ids, so a random replacement is recognisable
CONTENT_IDS = (5000, 21128)
WHOLE_WORD_MODES = ("wwm", "wwm+span")


def make_sequence(rng: np.random.Generator, seq_len: int, min_content_tokens: int = 20):
    """(token_ids, word_starts, maskable, word_ids): [CLS] content [SEP] [PAD]..., words of 1-4 tokens."""
    n_content = int(rng.integers(min_content_tokens, seq_len - 1))
    token_ids = np.full(seq_len, PAD_ID, dtype=np.int64)
    token_ids[0], token_ids[n_content + 1] = CLS_ID, SEP_ID
    token_ids[1 : n_content + 1] = rng.integers(*CONTENT_IDS, size=n_content)
    word_lengths = rng.integers(1, 5, size=n_content)
    word_start_positions = 1 + np.cumsum(word_lengths) - word_lengths
    word_starts = np.zeros(seq_len, dtype=bool)
    word_starts[word_start_positions[word_start_positions <= n_content]] = True
    maskable = np.zeros(seq_len, dtype=bool)
    maskable[1 : n_content + 1] = True
    word_ids = np.where(maskable, np.cumsum(word_starts), -1)
    return token_ids, word_starts, maskable, word_ids


def masking_kwargs(mode: str, mask_prob: float = 0.15, **extra) -> dict:
    return dict(mode=mode, mask_prob=mask_prob, mask_token_id=MASK_ID, random_token_ids=RANDOM_IDS, **extra)


def masked_samples(mode: str, mask_prob: float, n_sequences: int, seq_len: int = 512, seed: int = 0):
    """Yield (token_ids, maskable, word_ids, input_ids, labels) for n_sequences synthetic sequences."""
    data_rng = np.random.default_rng(seed)
    for index in range(n_sequences):
        token_ids, word_starts, maskable, word_ids = make_sequence(data_rng, seq_len)
        input_ids, labels = mask_sequence(
            token_ids, word_starts, maskable=maskable, rng=sample_rng(seed, 0, index), **masking_kwargs(mode, mask_prob)
        )
        yield token_ids, maskable, word_ids, input_ids, labels


def expected_clipped_geometric_mean(span_p: float, cap: int) -> float:
    """E[min(G, cap)] for G ~ Geometric(span_p) on {1, 2, ...}: sum over k < cap of P(G > k)."""
    return sum((1 - span_p) ** k for k in range(cap))


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
@pytest.mark.parametrize("mode", MASKING_MODES)
def test_masked_share_matches_mask_prob(mode, mask_prob):
    masked_tokens = maskable_tokens = 0
    for _, maskable, _, _, labels in masked_samples(mode, mask_prob, n_sequences=600):
        masked_tokens += int((labels != IGNORE_INDEX).sum())
        maskable_tokens += int(maskable.sum())
    assert abs(masked_tokens / maskable_tokens - mask_prob) < 0.01


@pytest.mark.parametrize("mode", MASKING_MODES)
def test_80_10_10_per_token_and_replacements_from_random_ids(mode):
    """Shares are measured per masked token (every token of a span shares its span's draw)."""
    counts = {"mask": 0, "random": 0, "kept": 0}
    for token_ids, _, _, input_ids, labels in masked_samples(mode, 0.15, n_sequences=1500, seed=1):
        chosen = labels != IGNORE_INDEX
        np.testing.assert_array_equal(labels[chosen], token_ids[chosen])
        replaced = input_ids[chosen]
        is_mask, is_random, is_kept = replaced == MASK_ID, np.isin(replaced, RANDOM_IDS), replaced == token_ids[chosen]
        # every masked token is exactly one of: [MASK], a random id from random_token_ids, its original
        np.testing.assert_array_equal(is_mask.astype(int) + is_random + is_kept, 1)
        counts["mask"] += int(is_mask.sum())
        counts["random"] += int(is_random.sum())
        counts["kept"] += int(is_kept.sum())
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.02
    assert abs(counts["random"] / total - 0.1) < 0.02
    assert abs(counts["kept"] / total - 0.1) < 0.02


def test_random_replacements_use_only_the_given_ids():
    allowed = np.array([7, 8, 9])
    token_ids, word_starts, maskable, _ = make_sequence(np.random.default_rng(3), 512, min_content_tokens=400)
    for index in range(50):
        input_ids, labels = mask_sequence(
            token_ids,
            word_starts,
            maskable=maskable,
            rng=sample_rng(3, 0, index),
            mode="token",
            mask_prob=0.5,
            mask_token_id=MASK_ID,
            random_token_ids=allowed,
        )
        changed = input_ids != token_ids
        assert set(input_ids[changed & (input_ids != MASK_ID)].tolist()) <= set(allowed.tolist())
        assert np.all(labels[changed] != IGNORE_INDEX)


@pytest.mark.parametrize("mode", WHOLE_WORD_MODES)
def test_whole_words_are_never_partly_masked_or_mixed(mode):
    for _, maskable, word_ids, input_ids, labels in masked_samples(mode, 0.3, n_sequences=300, seed=2):
        chosen = labels != IGNORE_INDEX
        ids = word_ids[maskable]
        # a word is masked all or nothing, and all its tokens get the same treatment
        for flags in (chosen, input_ids == MASK_ID, np.isin(input_ids, RANDOM_IDS)):
            per_word_count = np.bincount(ids, weights=flags[maskable])
            per_word_size = np.bincount(ids)
            assert np.all((per_word_count == 0) | (per_word_count == per_word_size))


@pytest.mark.parametrize("mode", MASKING_MODES)
def test_non_maskable_positions_are_never_masked(mode):
    data_rng = np.random.default_rng(4)
    for index in range(100):
        token_ids, word_starts, maskable, _ = make_sequence(data_rng, 64, min_content_tokens=3)
        maskable[data_rng.random(64) < 0.1] = False  # also special tokens inside the text
        input_ids, labels = mask_sequence(
            token_ids, word_starts, maskable=maskable, rng=sample_rng(4, 0, index), **masking_kwargs(mode, 0.5)
        )
        np.testing.assert_array_equal(input_ids[~maskable], token_ids[~maskable])
        assert np.all(labels[~maskable] == IGNORE_INDEX)
        assert input_ids.dtype == labels.dtype == np.int64


def test_word_continuation_after_a_special_token_starts_its_own_unit():
    word_starts = np.array([False, False, True, False, False, True, False])
    maskable = np.array([False, True, True, True, False, True, True])
    units = find_units(word_starts, maskable, whole_words=True)
    np.testing.assert_array_equal(units.token_unit, [-1, 0, 1, 1, -1, 2, 2])
    np.testing.assert_array_equal(units.lengths, [1, 2, 2])
    np.testing.assert_array_equal(units.segments, [0, 0, 1])
    np.testing.assert_array_equal(
        find_units(word_starts, maskable, whole_words=False).token_unit, [-1, 0, 1, 2, -1, 3, 4]
    )


@pytest.mark.parametrize(("span_p", "cap"), [(0.2, 10), (0.5, 3)])
@pytest.mark.parametrize("words", [False, True], ids=["token-units", "word-units"])
def test_span_lengths_follow_the_clipped_geometric_law(span_p, cap, words):
    """Only a sequence's last span can be cut by the budget, so it is left out of the mean."""
    data_rng = np.random.default_rng(5)
    n_units = 20_000
    lengths = []
    for seed in range(8):
        unit_lengths = data_rng.integers(1, 5, size=n_units) if words else np.ones(n_units, dtype=np.int64)
        budget = masking_budget(int(unit_lengths.sum()), 0.15)
        starts, span_units = sample_spans(
            unit_lengths, np.zeros(n_units, dtype=np.int64), budget, np.random.default_rng(seed), span_p, cap
        )
        lengths.append(span_units[:-1])
    lengths = np.concatenate(lengths)
    assert len(lengths) > 1000
    assert lengths.max() == cap
    assert abs(lengths.mean() - expected_clipped_geometric_mean(span_p, cap)) < 0.1
    assert abs(np.mean(lengths == cap) - (1 - span_p) ** (cap - 1)) < 0.02


def test_spans_are_disjoint_stay_in_their_segment_and_respect_the_budget():
    data_rng = np.random.default_rng(6)
    for seed in range(200):
        n_units = int(data_rng.integers(1, 300))
        unit_lengths = data_rng.integers(1, 5, size=n_units)
        unit_segments = np.cumsum(data_rng.random(n_units) < 0.05)  # runs of maskable tokens
        budget = masking_budget(int(unit_lengths.sum()), 0.3)
        starts, span_units = sample_spans(unit_lengths, unit_segments, budget, np.random.default_rng(seed), 0.2, 10)
        covered = np.zeros(n_units, dtype=int)
        for start, length in zip(starts, span_units, strict=True):
            assert length >= 1
            covered[start : start + length] += 1
            assert unit_segments[start] == unit_segments[start + length - 1]
        assert covered.max(initial=0) <= 1
        masked_tokens = int(unit_lengths[covered == 1].sum())
        assert masked_tokens < budget + unit_lengths.max()


def test_span_modes_mask_longer_runs_than_single_unit_modes():
    def mean_masked_run(mode):
        runs = []
        for _, _, _, _, labels in masked_samples(mode, 0.15, n_sequences=100, seed=7):
            chosen = np.concatenate(([0], (labels != IGNORE_INDEX).astype(int), [0]))
            edges = np.flatnonzero(np.diff(chosen))
            runs.extend(edges[1::2] - edges[::2])
        return np.mean(runs)

    # adjacent spans merge into one run, so a span's mean length is a lower bound for the run length
    assert mean_masked_run("span") >= expected_clipped_geometric_mean(0.2, 10) - 0.1
    assert mean_masked_run("token") < 1.5


def test_budget():
    assert masking_budget(0, 0.15) == 0
    assert masking_budget(1, 0.15) == 1
    assert masking_budget(100, 0.15) == 15
    assert masking_budget(100, 0.0) == 0
    for _, maskable, _, _, labels in masked_samples("token", 0.15, n_sequences=20):
        assert (labels != IGNORE_INDEX).sum() == masking_budget(int(maskable.sum()), 0.15)


@pytest.mark.parametrize("mode", MASKING_MODES)
def test_same_seed_same_mask_and_different_seeds_differ(mode):
    token_ids, word_starts, maskable, _ = make_sequence(np.random.default_rng(8), 512, min_content_tokens=300)

    def masked(seed, epoch, index):
        return mask_sequence(
            token_ids, word_starts, maskable=maskable, rng=sample_rng(seed, epoch, index), **masking_kwargs(mode)
        )

    first, again = masked(1, 0, 5), masked(1, 0, 5)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    for other in (masked(2, 0, 5), masked(1, 1, 5), masked(1, 0, 6)):
        assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("mode", MASKING_MODES)
def test_mask_batch_equals_per_sequence_masking_whatever_the_batching(mode):
    data_rng = np.random.default_rng(9)
    rows = [make_sequence(data_rng, 128) for _ in range(6)]
    token_ids, word_starts, maskable = (np.stack([row[i] for row in rows]) for i in range(3))
    kwargs = masking_kwargs(mode)
    whole_inputs, whole_labels = mask_batch(
        token_ids, word_starts, maskable, [sample_rng(0, 3, i) for i in range(6)], **kwargs
    )
    assert whole_inputs.shape == whole_labels.shape == (6, 128)
    # the same samples split into other batches (as with another batch size or rank count)
    part_inputs, part_labels = mask_batch(
        token_ids[2:5], word_starts[2:5], maskable[2:5], [sample_rng(0, 3, i) for i in range(2, 5)], **kwargs
    )
    np.testing.assert_array_equal(part_inputs, whole_inputs[2:5])
    np.testing.assert_array_equal(part_labels, whole_labels[2:5])
    for i in range(6):
        inputs, labels = mask_sequence(
            token_ids[i], word_starts[i], maskable=maskable[i], rng=sample_rng(0, 3, i), **kwargs
        )
        np.testing.assert_array_equal(inputs, whole_inputs[i])
        np.testing.assert_array_equal(labels, whole_labels[i])


def test_nothing_maskable_masks_nothing():
    for token_ids, maskable in ((np.zeros(0, dtype=np.int64), None), (np.array([CLS_ID, SEP_ID]), np.zeros(2, bool))):
        input_ids, labels = mask_sequence(
            token_ids,
            np.zeros(len(token_ids), bool),
            maskable=maskable,
            rng=sample_rng(0, 0, 0),
            **masking_kwargs("wwm+span"),
        )
        np.testing.assert_array_equal(input_ids, token_ids)
        assert np.all(labels == IGNORE_INDEX)


def test_maskable_defaults_to_every_position():
    token_ids = np.arange(5000, 5010)
    _, labels = mask_sequence(token_ids, np.ones(10, bool), rng=sample_rng(0, 0, 0), **masking_kwargs("token", 1.0))
    np.testing.assert_array_equal(labels, token_ids)


@pytest.mark.parametrize(
    "bad",
    [
        dict(mode="bert"),
        dict(mode="WWM"),
        dict(mask_prob=1.5),
        dict(random_token_ids=np.array([], dtype=np.int64)),
        dict(span_p=0.0),
        dict(span_max_words=0),
    ],
)
def test_invalid_settings_raise_value_error(bad):
    kwargs = {**masking_kwargs("wwm+span"), **bad}
    with pytest.raises(ValueError):
        mask_sequence(np.arange(5000, 5010), np.ones(10, bool), rng=sample_rng(0, 0, 0), **kwargs)


def test_mismatched_shapes_raise_value_error():
    with pytest.raises(ValueError):
        mask_sequence(np.arange(5000, 5010), np.ones(9, bool), rng=sample_rng(0, 0, 0), **masking_kwargs("wwm"))
    with pytest.raises(ValueError):
        mask_batch(
            np.zeros((2, 4), int),
            np.zeros((2, 4), bool),
            np.ones((2, 4), bool),
            [sample_rng(0, 0, 0)],
            **masking_kwargs("wwm"),
        )


UNK_ID = 100


def sequence_with_unks(rng: np.random.Generator, seq_len: int = 256, unk_share: float = 0.15):
    """make_sequence with [UNK] at random content positions: word starts, continuations, whole words."""
    token_ids, word_starts, maskable, word_ids = make_sequence(rng, seq_len, min_content_tokens=100)
    unk = maskable & (rng.random(seq_len) < unk_share)
    token_ids[unk] = UNK_ID
    return token_ids, word_starts, maskable, word_ids, unk


@pytest.mark.parametrize("unk_maskable", [True, False])  # data.py passes [UNK] as non-maskable; both must hold
@pytest.mark.parametrize("mode", MASKING_MODES)
def test_unk_is_never_a_target_and_stays_unk_in_the_input(mode, unk_maskable):
    data_rng = np.random.default_rng(7)
    targets = 0
    for index in range(300):
        token_ids, word_starts, maskable, _, unk = sequence_with_unks(data_rng)
        input_ids, labels = mask_sequence(
            token_ids, word_starts, maskable=maskable if unk_maskable else maskable & ~unk,
            rng=sample_rng(0, 0, index), unk_token_id=UNK_ID, **masking_kwargs(mode, 0.3))
        assert (labels[unk] == IGNORE_INDEX).all()
        assert (input_ids[unk] == UNK_ID).all()
        assert not (labels == UNK_ID).any()
        targets += int((labels != IGNORE_INDEX).sum())
    assert targets > 300 * 100 * 0.85 * 0.3 * 0.8  # the other tokens are still masked at about mask_prob


@pytest.mark.parametrize("mode", MASKING_MODES)
def test_unk_is_left_out_of_the_budget(mode):
    data_rng = np.random.default_rng(8)
    masked_tokens = candidates = 0
    for index in range(600):
        token_ids, word_starts, maskable, _, unk = sequence_with_unks(data_rng, seq_len=512)
        _, labels = mask_sequence(token_ids, word_starts, maskable=maskable, rng=sample_rng(1, 0, index),
                                  unk_token_id=UNK_ID, **masking_kwargs(mode, 0.15))
        masked_tokens += int((labels != IGNORE_INDEX).sum())
        candidates += int((maskable & ~unk).sum())
    assert abs(masked_tokens / candidates - 0.15) < 0.01


@pytest.mark.parametrize("mode", WHOLE_WORD_MODES)
def test_a_word_with_an_unk_inside_is_masked_whole_for_its_other_tokens(mode):
    """[UNK] splits no word: the word's other tokens are all targets or none (an [UNK] that is
    not a boundary), and such words do get masked."""
    data_rng = np.random.default_rng(9)
    words_with_unk_masked = 0
    for index in range(400):
        token_ids, word_starts, maskable, word_ids, unk = sequence_with_unks(data_rng, unk_share=0.2)
        _, labels = mask_sequence(token_ids, word_starts, maskable=maskable & ~unk, rng=sample_rng(2, 0, index),
                                  unk_token_id=UNK_ID, **masking_kwargs(mode, 0.3))
        for word in np.unique(word_ids[unk]):
            others = (word_ids == word) & ~unk
            if not others.any():
                continue
            chosen = labels[others] != IGNORE_INDEX
            assert chosen.all() or not chosen.any()
            words_with_unk_masked += int(chosen.all())
    assert words_with_unk_masked > 100


def test_unk_inside_a_word_joins_its_pieces_into_one_unit():
    #              [CLS]  A     [UNK]  B      C     [SEP]
    word_starts = np.array([0, 1, 0, 0, 1, 0], dtype=bool)
    maskable = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    no_target = np.array([0, 0, 1, 0, 0, 0], dtype=bool)
    units = find_units(word_starts, maskable, whole_words=True, no_target=no_target)
    assert units.token_unit.tolist() == [-1, 0, -1, 0, 1, -1]
    assert units.lengths.tolist() == [2, 1]
    assert units.segments.tolist() == [0, 0]  # a span may run across the [UNK]
    separated = find_units(word_starts, maskable, whole_words=True)  # without no_target it is a boundary
    assert separated.token_unit.tolist() == [-1, 0, -1, 1, 2, -1]
    assert separated.segments.tolist() == [0, 1, 1]


def test_training_batches_never_target_unk(tmp_path):
    """The wiring: data.build_batch with the spec train builds from a real tokenizer."""
    from cpt.common.base_model import load_tokenizer
    from cpt.training.batches import build_batch, masking_spec_for
    from cpt.training.model import asset_path

    base = tmp_path / "base"
    base.mkdir()
    (base / "vocab.txt").write_bytes(asset_path("zh_vocab.txt").read_bytes())
    (base / "config.json").write_text('{"model_type": "bert", "vocab_size": 21128}')
    tokenizer = load_tokenizer(base)
    text = "他说：“今天的天气很好……”——她却说‘不’。" * 6
    ids = np.array(tokenizer.encode_with_specials([text], 512)[0])
    assert (ids == tokenizer.unk_token_id).sum() >= 30

    class OneSequence:
        def sequence(self, index):
            return ids, np.ones(len(ids), dtype=bool)

    for mode in MASKING_MODES:
        spec = masking_spec_for(tokenizer, mode, 0.5, 0.2, 10)
        for seed in range(20):
            batch = build_batch(OneSequence(), [(0, 0), (1, 0)], spec, seed)
            labels, input_ids = batch["labels"].numpy(), batch["input_ids"].numpy()
            assert not (labels == tokenizer.unk_token_id).any()
            assert (input_ids[:, ids == tokenizer.unk_token_id] == tokenizer.unk_token_id).all()
            assert (labels != IGNORE_INDEX).sum() > 0
