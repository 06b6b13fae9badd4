"""Resumable data order and batch building: which sequences make each step, masked and padded.

The order is a pure function of (seed, epoch): a permutation per epoch. The sampler's state is
just (epoch, position), so resuming needs no skipping of batches. Each sequence's masks come from
its own generator, seeded by (seed, epoch, index): masks don't depend on batch size, micro-batch
split or number of processes, and a resumed run draws exactly the masks it would have drawn.

    order = SamplerState(epoch=0, position=0)
    picks, order = next_global_batch(order, num_sequences=len(shards), count=32, seed=42)
    batch = build_batch(shards, picks[:16], masking, seed=42)      # dict of (B, T) tensors
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from cpt.masking import mask_sequence, sample_rng
from cpt.model import IGNORE_INDEX
from cpt.shards import ShardSet


@dataclass(frozen=True)
class SamplerState:
    epoch: int = 0
    position: int = 0  # sequences of this epoch's permutation already handed out

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> SamplerState:
        return cls(epoch=int(state["epoch"]), position=int(state["position"]))


@dataclass(frozen=True)
class MaskingSpec:
    mode: str
    mask_prob: float
    span_p: float
    span_max_words: int
    mask_token_id: int
    pad_token_id: int
    special_ids: np.ndarray  # ids never masked ([CLS], [SEP], [PAD], [MASK], ...)
    random_token_ids: np.ndarray  # ids a 10% random replacement may take


def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_sequences)


def next_global_batch(
    state: SamplerState, *, num_sequences: int, count: int, seed: int
) -> tuple[list[tuple[int, int]], SamplerState]:
    """`count` (epoch, sequence index) picks from the current position on, crossing epochs as needed."""
    picks: list[tuple[int, int]] = []
    epoch, position = state.epoch, state.position
    while len(picks) < count:
        order = epoch_permutation(num_sequences, seed, epoch)
        take = order[position : position + count - len(picks)]
        picks.extend((epoch, int(index)) for index in take)
        position += len(take)
        if position >= num_sequences:
            epoch, position = epoch + 1, 0
    return picks, SamplerState(epoch=epoch, position=position)


def masking_spec_for(tokenizer, mode: str, mask_prob: float, span_p: float, span_max_words: int) -> MaskingSpec:
    special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    vocab = tokenizer.get_vocab()
    # Random replacements are real tokens: not special, not the [unusedN] placeholders of BERT vocabs.
    random_ids = np.array(
        sorted(i for token, i in vocab.items() if i not in set(special_ids.tolist()) and not token.startswith("[")),
        dtype=np.int64,
    )
    return MaskingSpec(mode=mode, mask_prob=mask_prob, span_p=span_p, span_max_words=span_max_words,
                       mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                       special_ids=special_ids, random_token_ids=random_ids)


WIDTH_MULTIPLE = 16


def batch_width(longest: int, max_width: int | None) -> int:
    """Padded width of a batch whose longest sequence has `longest` tokens: rounded up to a multiple of 16
    (at most max_width) when max_width is given. Few distinct shapes keep oneDNN's per-shape kernel cache
    small: with every width from 20 to 128, bf16 training on CPU grew to 1.2 GB RSS, rounded 0.5 GB."""
    if max_width is None:
        return longest
    return max(longest, min(-(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, max_width))


def build_batch(shards: ShardSet, picks: list[tuple[int, int]], spec: MaskingSpec, seed: int,
                max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Masked, right-padded tensors for the picked sequences: input_ids, attention_mask, labels (B, T)."""
    rows = [shards.sequence(index) for _epoch, index in picks]
    width = batch_width(max(len(ids) for ids, _ in rows), max_width)
    input_ids = np.full((len(rows), width), spec.pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, ((epoch, index), (ids, starts)) in enumerate(zip(picks, rows, strict=True)):
        maskable = ~np.isin(ids, spec.special_ids)
        masked, row_labels = mask_sequence(
            ids, starts, mode=spec.mode, mask_prob=spec.mask_prob, rng=sample_rng(seed, epoch, index),
            mask_token_id=spec.mask_token_id, random_token_ids=spec.random_token_ids, maskable=maskable,
            span_p=spec.span_p, span_max_words=spec.span_max_words,
        )
        input_ids[row, : len(ids)] = masked
        labels[row, : len(ids)] = row_labels
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


def split_for_rank(picks: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of a global batch."""
    per_rank = len(picks) // world_size
    return picks[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(picks: list, micro_batch_size: int) -> list[list]:
    return [picks[start : start + micro_batch_size] for start in range(0, len(picks), micro_batch_size)]
