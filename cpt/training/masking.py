"""Dynamic masked-LM masking: pure, seeded, one sequence at a time (numpy).

The training loop masks every sample afresh each epoch with a generator derived from
(seed, epoch, sample index), so a sample's mask does not depend on batch size, rank count or
resume point::

    rngs = [sample_rng(seed, epoch, i) for i in sample_indices]
    input_ids, labels = mask_batch(token_ids, word_starts, maskable, rngs, mode="wwm+span",
                                   mask_prob=0.15, mask_token_id=tok.mask_token_id,
                                   random_token_ids=ordinary_token_ids)

Modes (a *unit* is what is masked as a whole; a *span* is a run of consecutive units):

- ``token``: BERT's original masking; a unit is one token, spans are one unit.
- ``wwm``: whole-word masking; a unit is a jieba word (its first token has ``word_starts``
  True, the following maskable tokens with ``word_starts`` False belong to it).
- ``span``: SpanBERT; units are tokens, span lengths ~ min(Geometric(span_p), span_max_words).
- ``wwm+span`` (default): spans of whole words; the same length law, counted in words.

Each sequence masks ``max(1, round(mask_prob * maskable_tokens))`` tokens in expectation (see
`select_single_units` and `sample_spans` for how a whole word that overshoots the budget is
handled). Each selected span (a single unit in ``token``/``wwm``) is then, as a whole,
replaced by [MASK] (80 %), by random ids (10 %) or left unchanged (10 %); labels are set in all
three cases. Unlike UER-py, words come from the pretokenised ``word_starts`` flags (no
re-tokenisation, so [UNK]s and spaces survive) and span masking is honoured under WWM.

[UNK] is never a prediction target (``unk_token_id``): its position gets no label and keeps its
id in the input, in every mode; the word or span around it is masked for its other tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

MASKING_MODES = ("wwm+span", "wwm", "span", "token")
IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross_entropy default)
MASK_TOKEN_SHARE = 0.8  # of selected spans, replaced by [MASK]
RANDOM_TOKEN_SHARE = 0.1  # of selected spans, replaced by random ids; the rest stay unchanged
_SPAN_DRAWS_PER_CHUNK = 32  # spans drawn per rng call: a call per span would cost more than the span


class Units(NamedTuple):
    """How a sequence's maskable tokens group into units (tokens or whole words)."""

    token_unit: np.ndarray  # (T,) int64 unit index of each token, -1 where not maskable
    lengths: np.ndarray  # (U,) int64 tokens per unit
    segments: np.ndarray  # (U,) int64 index of the run of maskable tokens holding the unit


def sample_rng(seed: int, epoch: int, sample_index: int) -> np.random.Generator:
    """An independent generator per (seed, epoch, sample), so masks don't depend on batching or ranks."""
    return np.random.default_rng([seed, epoch, sample_index])


def masking_budget(maskable_tokens: int, mask_prob: float) -> int:
    """Tokens to mask in a sequence: at least one whenever anything is maskable and mask_prob > 0."""
    if maskable_tokens == 0 or mask_prob == 0:
        return 0
    return max(1, round(mask_prob * maskable_tokens))


def find_units(word_starts: np.ndarray, maskable: np.ndarray, whole_words: bool,
               no_target: np.ndarray | None = None) -> Units:
    """Group maskable tokens into whole words (`whole_words`) or single tokens.

    A word continuation right after a non-maskable position (e.g. after [CLS] when a sequence
    was cut mid-word) starts a unit of its own, so a unit never spans a non-maskable token.
    `no_target` (T,) bool marks positions that are never predicted but are no boundary either
    ([UNK]): they belong to no unit, yet the word around them stays one unit (its other tokens
    are masked together) and a span may run across them.
    """
    gap = ~maskable if no_target is None else ~(maskable | no_target)  # (T,) bool: ends words and segments
    after_gap = np.concatenate(([True], gap[:-1]))[: len(maskable)]  # (T,) bool
    segment_id = np.cumsum(~gap & after_gap) - 1  # (T,) int64 run of non-gap positions
    positions = np.flatnonzero(maskable)  # (M,)
    starts = np.ones(len(positions), dtype=bool)  # (M,) bool: this maskable token starts a unit
    if whole_words:
        word_id = np.cumsum(word_starts | after_gap)[positions]  # (M,) int64 word of each maskable token
        starts[1:] = word_id[1:] != word_id[:-1]
    unit_of = np.cumsum(starts) - 1  # (M,) int64
    token_unit = np.full(len(maskable), -1, dtype=np.int64)
    token_unit[positions] = unit_of
    lengths = np.bincount(unit_of, minlength=int(starts.sum())).astype(np.int64)
    return Units(token_unit, lengths, segment_id[positions[starts]].astype(np.int64))


def select_single_units(unit_lengths: np.ndarray, budget_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of units to mask one by one (``token``/``wwm``), in random order.

    Units are taken in a random order while they fit the budget; the first one that would
    overshoot is taken with probability (tokens left / its length), so the expected number of
    masked tokens equals the budget even when words are several tokens long.
    """
    order = rng.permutation(len(unit_lengths))
    tokens_so_far = np.cumsum(unit_lengths[order])
    n_fit = int(np.searchsorted(tokens_so_far, budget_tokens, side="right"))
    if n_fit < len(order):
        tokens_left = budget_tokens - (int(tokens_so_far[n_fit - 1]) if n_fit else 0)
        if tokens_left > 0 and rng.random() < tokens_left / unit_lengths[order[n_fit]]:
            n_fit += 1
    return order[:n_fit]


def _span_draws(rng: np.random.Generator, span_p: float, span_max_units: int) -> Iterator[tuple[int, float, float]]:
    """Endless (span length in units, uniform for the start, uniform for the last unit), drawn in chunks."""
    while True:
        lengths = np.minimum(rng.geometric(span_p, size=_SPAN_DRAWS_PER_CHUNK), span_max_units)
        uniforms = rng.random((_SPAN_DRAWS_PER_CHUNK, 2))
        yield from zip(lengths.tolist(), uniforms[:, 0].tolist(), uniforms[:, 1].tolist(), strict=True)


def sample_spans(
    unit_lengths: np.ndarray,
    unit_segments: np.ndarray,
    budget_tokens: int,
    rng: np.random.Generator,
    span_p: float,
    span_max_units: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping spans of consecutive units within one segment: (first unit, units) arrays.

    unit_lengths: (U,) tokens per unit; unit_segments: (U,) non-decreasing run index of each unit.

    Like SpanBERT: draw a length ~ min(Geometric(span_p), span_max_units), then a start uniformly
    among the places where that many free units of one segment follow. Drawing the start among
    places that fit (rather than rejecting collisions) keeps the length law intact as the
    sequence fills up. The last span is cut to the budget; a whole word that would overshoot it
    is kept with probability (tokens left / its length), so the expected masked count equals the
    budget. Only when no free run is long enough is a span shortened to the longest free run.
    """
    n_units = len(unit_lengths)
    segment_ends = np.searchsorted(unit_segments, unit_segments, side="right")  # (U,) first unit past i's segment
    # free_run[i]: free units from i to the end of its segment, capped since longer runs never matter
    free_run = np.minimum(segment_ends - np.arange(n_units), span_max_units)
    tokens_before = np.concatenate(([0], np.cumsum(unit_lengths))).tolist()  # (U + 1,) tokens before unit i
    starts: list[int] = []
    span_units: list[int] = []
    tokens_left = budget_tokens
    draws = _span_draws(rng, span_p, span_max_units)
    while tokens_left > 0 and n_units:
        length, u_start, u_last = next(draws)
        candidates = (free_run >= length).nonzero()[0]
        if candidates.size == 0:
            length = int(free_run.max())
            if length == 0:
                break
            candidates = (free_run >= length).nonzero()[0]
        start = int(candidates[int(u_start * candidates.size)])
        span_tokens = tokens_before[start + length] - tokens_before[start]
        if span_tokens > tokens_left:
            # units of the span that fit whole, then the overshooting one with probability left / its length
            n_fit = bisect.bisect_right(tokens_before, tokens_before[start] + tokens_left, start) - 1 - start
            left_for_last = tokens_before[start] + tokens_left - tokens_before[start + n_fit]
            n_fit += int(u_last * (tokens_before[start + n_fit + 1] - tokens_before[start + n_fit]) < left_for_last)
            if n_fit == 0:
                break
            length, span_tokens = n_fit, tokens_left  # the last span either way
        tokens_left -= span_tokens
        starts.append(start)
        span_units.append(length)
        free_run[start : start + length] = 0
        # free units just before the span now end at it
        before = start - 1
        while before >= 0 and free_run[before] > start - before:
            free_run[before] = start - before
            before -= 1
    return np.array(starts, dtype=np.int64), np.array(span_units, dtype=np.int64)


def spans_to_unit_groups(n_units: int, starts: np.ndarray, span_units: np.ndarray) -> np.ndarray:
    """(U,) int64: the span index covering each unit, -1 for units left alone."""
    unit_group = np.full(n_units, -1, dtype=np.int64)
    offsets = np.arange(int(span_units.sum())) - np.repeat(np.cumsum(span_units) - span_units, span_units)
    unit_group[np.repeat(starts, span_units) + offsets] = np.repeat(np.arange(len(starts)), span_units)
    return unit_group


def replace_groups(
    token_ids: np.ndarray,
    token_group: np.ndarray,
    n_groups: int,
    rng: np.random.Generator,
    mask_token_id: int,
    random_token_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply 80/10/10 per group (span or unit) so a word is never half [MASK], half original."""
    selected = token_group >= 0  # (T,) bool
    choice = np.ones(len(token_group))  # (T,) float: its group's draw; unselected tokens keep 1.0, never read
    choice[selected] = rng.random(n_groups)[token_group[selected]]
    to_mask = selected & (choice < MASK_TOKEN_SHARE)
    to_random = selected & (choice >= MASK_TOKEN_SHARE) & (choice < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    input_ids = token_ids.astype(np.int64)  # a copy
    input_ids[to_mask] = mask_token_id
    input_ids[to_random] = random_token_ids[rng.integers(0, len(random_token_ids), size=int(to_random.sum()))]
    labels = np.where(selected, token_ids, IGNORE_INDEX).astype(np.int64)
    return input_ids, labels


def _check_settings(mode: str, mask_prob: float, random_token_ids: np.ndarray, span_p: float, span_max_words: int):
    """Reject settings that would silently mask nothing or the wrong way."""
    if mode not in MASKING_MODES:
        raise ValueError(f"unknown masking mode {mode!r}; choose one of {', '.join(MASKING_MODES)}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if len(random_token_ids) == 0:
        raise ValueError("random_token_ids is empty; pass the ids random replacements may use")
    if not 0.0 < span_p <= 1.0:
        raise ValueError(f"span_p must be in (0, 1], got {span_p}")
    if span_max_words < 1:
        raise ValueError(f"span_max_words must be >= 1, got {span_max_words}")


def mask_sequence(
    token_ids: np.ndarray,
    word_starts: np.ndarray,
    *,
    mode: str,
    mask_prob: float,
    rng: np.random.Generator,
    mask_token_id: int,
    random_token_ids: np.ndarray,
    maskable: np.ndarray | None = None,
    span_p: float = 0.2,
    span_max_words: int = 10,
    unk_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence: (input_ids, labels), both (T,) int64; labels are -100 where not predicted.

    token_ids: (T,) int; word_starts: (T,) bool, True where a token starts a jieba word;
    maskable: (T,) bool, False for [CLS]/[SEP]/[PAD] (default: all True).
    unk_token_id: positions holding it are never targets (predicting [UNK] teaches nothing) and stay
    [UNK] in the input, whatever `maskable` says; they are not counted in the budget, but they split
    no word and no span: a word with an [UNK] inside is still masked as a whole for its other tokens.
    """
    _check_settings(mode, mask_prob, random_token_ids, span_p, span_max_words)
    token_ids = np.asarray(token_ids)
    word_starts = np.asarray(word_starts, dtype=bool)
    maskable = np.ones(len(token_ids), dtype=bool) if maskable is None else np.asarray(maskable, dtype=bool)
    if not token_ids.shape == word_starts.shape == maskable.shape or token_ids.ndim != 1:
        raise ValueError(
            f"token_ids, word_starts and maskable must be 1-D of one length, got shapes "
            f"{token_ids.shape}, {word_starts.shape}, {maskable.shape}"
        )
    no_target = None
    if unk_token_id is not None:
        no_target = token_ids == unk_token_id  # (T,) bool
        if no_target.any():
            maskable = maskable & ~no_target
        else:
            no_target = None
    units = find_units(word_starts, maskable, whole_words=mode in ("wwm", "wwm+span"), no_target=no_target)
    budget_tokens = masking_budget(int(maskable.sum()), mask_prob)
    n_units = len(units.lengths)
    if mode in ("token", "wwm"):
        chosen = select_single_units(units.lengths, budget_tokens, rng)
        unit_group = np.full(n_units, -1, dtype=np.int64)
        unit_group[chosen] = np.arange(len(chosen))
        n_groups = len(chosen)
    else:
        starts, span_units = sample_spans(units.lengths, units.segments, budget_tokens, rng, span_p, span_max_words)
        unit_group = spans_to_unit_groups(n_units, starts, span_units)
        n_groups = len(starts)
    # index -1 (non-maskable) reads the appended -1, so those tokens stay unselected
    token_group = np.append(unit_group, -1)[units.token_unit]  # (T,) int64
    return replace_groups(token_ids, token_group, n_groups, rng, mask_token_id, np.asarray(random_token_ids))


def mask_batch(
    token_ids: np.ndarray,
    word_starts: np.ndarray,
    maskable: np.ndarray,
    rngs: list[np.random.Generator],
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a (B, T) batch row by row, row b with rngs[b]: (input_ids, labels), both (B, T) int64.

    kwargs are mask_sequence's (mode, mask_prob, mask_token_id, random_token_ids, ...).
    """
    if not len(token_ids) == len(word_starts) == len(maskable) == len(rngs):
        raise ValueError(
            f"need one row of word_starts, maskable and one rng per sequence, got {len(token_ids)} sequences, "
            f"{len(word_starts)} word_starts, {len(maskable)} maskable, {len(rngs)} rngs"
        )
    rows = [
        mask_sequence(ids, starts, maskable=can_mask, rng=rng, **kwargs)
        for ids, starts, can_mask, rng in zip(token_ids, word_starts, maskable, rngs, strict=True)
    ]
    if not rows:
        return np.zeros(np.shape(token_ids), dtype=np.int64), np.zeros(np.shape(token_ids), dtype=np.int64)
    return np.stack([row[0] for row in rows]), np.stack([row[1] for row in rows])
