"""Resumable data order and batch building: which sequences make each step, masked and padded.

The order is a pure function of (seed, epoch): a permutation per epoch. The sampler's state is
just (epoch, position), so resuming needs no skipping of batches. Each sequence's masks come from
its own generator, seeded by (seed, epoch, index): masks don't depend on batch size, micro-batch
split or number of processes, and a resumed run draws exactly the masks it would have drawn.
With --replay-share, each global batch also takes its share of sequences from the replay shards, in
an order of their own (next_mixed_batch); the state counts them in `replay_position`.

    order = SamplerState(epoch=0, position=0)
    picks, order = next_global_batch(order, num_sequences=len(shards), count=32, seed=42)
    batch = build_batch(shards, picks[:16], masking, seed=42)      # dict of (B, T) tensors
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from cpt.data.shards import ShardSet
from cpt.training.masking import mask_sequence, sample_rng
from cpt.training.model import IGNORE_INDEX


@dataclass(frozen=True)
class SamplerState:
    epoch: int = 0
    position: int = 0  # sequences of this epoch's permutation already handed out
    replay_position: int = 0  # --replay-share: replay sequences handed out so far (all replay epochs)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> SamplerState:
        return cls(epoch=int(state["epoch"]), position=int(state["position"]),
                   replay_position=int(state.get("replay_position", 0)))


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
    is_special_id: np.ndarray  # (vocab size,) bool, True at special_ids: a lookup 3x faster than np.isin per row
    unk_token_id: int | None = None  # never a target, but no word or span boundary (cpt/training/masking.py)


DOMAIN_STREAM, REPLAY_STREAM = 0x5EED, 0x4E91A7  # the replay corpus has an order of its own


@functools.lru_cache(maxsize=4)  # this epoch's and the next (a global batch can cross into it), of both streams
def epoch_permutation(num_sequences: int, seed: int, epoch: int, stream: int = DOMAIN_STREAM) -> np.ndarray:
    """The order of an epoch's sequences, (N,) read-only. Cached: drawing it takes ~20 ns per sequence
    (50 ms for the 2.6M sequences of a 1 GB corpus, bench/loader_bench.py), too much to repeat every step."""
    order = np.random.default_rng([seed, epoch, stream]).permutation(num_sequences)
    order.setflags(write=False)
    return order


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
    return picks, SamplerState(epoch=epoch, position=position, replay_position=state.replay_position)


SHARE_SCALE = 1_000_000  # --replay-share in millionths: the split of every batch in exact integer arithmetic


def replay_sequences_among(total_sequences: int, share: float) -> int:
    """How many of a run's first `total_sequences` sequences are replay ones: floor(total x share). Step s takes
    the difference between s + 1 and s batches' worth (round(share x G) or one off it), so the share over any
    run of steps is exact to one sequence, not off by up to 1/(2G) as a fixed round(share x G) would be."""
    return total_sequences * round(share * SHARE_SCALE) // SHARE_SCALE


def replay_picks(position: int, count: int, *, num_sequences: int, seed: int) -> list[tuple[int, int]]:
    """Positions [position, position + count) of the replay stream as (epoch, index): epoch = position // N,
    a permutation per epoch of its own stream. Picks of a step are a pure function of (seed, step)."""
    picks = []
    for at in range(position, position + count):
        epoch, offset = divmod(at, num_sequences)
        picks.append((epoch, int(epoch_permutation(num_sequences, seed, epoch, REPLAY_STREAM)[offset])))
    return picks


def next_mixed_batch(state: SamplerState, *, num_sequences: int, num_replay: int, count: int, share: float,
                     seed: int) -> tuple[list[tuple[int, int]], SamplerState]:
    """A global batch of `count` picks, replay ones included: the domain sampler advances by count - k, the
    replay stream by k. Replay picks index past the domain's (num_sequences + replay index, see MixedShards),
    so their masks are drawn from generators no domain sequence uses."""
    handed_out = state.epoch * num_sequences + state.position + state.replay_position  # = step x count
    replay_count = replay_sequences_among(handed_out + count, share) - state.replay_position
    picks, after = next_global_batch(state, num_sequences=num_sequences, count=count - replay_count, seed=seed)
    picks += [(epoch, num_sequences + index) for epoch, index in
              replay_picks(state.replay_position, replay_count, num_sequences=num_replay, seed=seed)]
    return picks, SamplerState(epoch=after.epoch, position=after.position,
                               replay_position=state.replay_position + replay_count)


class MixedShards:
    """The domain train shards followed by the replay train shards, behind ShardSet's read interface: index
    i < len(domain) is a domain sequence, else replay sequence i - len(domain)."""

    def __init__(self, domain: ShardSet, replay: ShardSet):
        self.domain, self.replay = domain, replay
        self.boundary = len(domain)

    def __len__(self) -> int:
        return self.boundary + len(self.replay)

    def is_replay(self, index: int) -> bool:
        return index >= self.boundary

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.replay.sequence(index - self.boundary) if index >= self.boundary else self.domain.sequence(index)

    def length(self, index: int) -> int:
        return self.replay.length(index - self.boundary) if index >= self.boundary else self.domain.length(index)


def masking_spec_for(tokenizer, mode: str, mask_prob: float, span_p: float, span_max_words: int) -> MaskingSpec:
    special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    vocab = tokenizer.get_vocab()
    # Random replacements are real tokens: not special, not the [unusedN] placeholders of BERT vocabs.
    random_ids = np.array(
        sorted(i for token, i in vocab.items() if i not in set(special_ids.tolist()) and not token.startswith("[")),
        dtype=np.int64,
    )
    is_special_id = np.zeros(max([*vocab.values(), *special_ids.tolist()]) + 1, dtype=bool)
    is_special_id[special_ids] = True
    return MaskingSpec(mode=mode, mask_prob=mask_prob, span_p=span_p, span_max_words=span_max_words,
                       mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                       special_ids=special_ids, random_token_ids=random_ids, is_special_id=is_special_id,
                       unk_token_id=tokenizer.unk_token_id)


WIDTH_MULTIPLE = 16


def batch_width(longest: int, max_width: int | None) -> int:
    """Padded width of a batch whose longest sequence has `longest` tokens: rounded up to a multiple of 16
    (at most max_width) when max_width is given. Few distinct shapes keep oneDNN's per-shape kernel cache
    small: with every width from 20 to 128, bf16 training on CPU grew to 1.2 GB RSS, rounded 0.5 GB."""
    if max_width is None:
        return longest
    return max(longest, min(-(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, max_width))


def build_batch(shards: ShardSet | MixedShards, picks: list[tuple[int, int]], spec: MaskingSpec, seed: int,
                max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Masked, right-padded tensors for the picked sequences: input_ids, attention_mask, labels (B, T)."""
    rows = [shards.sequence(index) for _epoch, index in picks]
    width = batch_width(max(len(ids) for ids, _ in rows), max_width)
    input_ids = np.full((len(rows), width), spec.pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, ((epoch, index), (ids, starts)) in enumerate(zip(picks, rows, strict=True)):
        maskable = ~spec.is_special_id[ids]
        masked, row_labels = mask_sequence(
            ids, starts, mode=spec.mode, mask_prob=spec.mask_prob, rng=sample_rng(seed, epoch, index),
            mask_token_id=spec.mask_token_id, random_token_ids=spec.random_token_ids, maskable=maskable,
            span_p=spec.span_p, span_max_words=spec.span_max_words, unk_token_id=spec.unk_token_id,
        )
        input_ids[row, : len(ids)] = masked
        labels[row, : len(ids)] = row_labels
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


def deal_to_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Positions into `lengths` for each rank: the same number of sequences each, and token counts within one
    sequence's length of each other. Longest first, each to the rank with the fewest tokens that still has room
    (ties: the lower rank), so a pure function of the lengths: every rank computes the same deal, and a resumed
    run deals as the uninterrupted one did. (Contiguous slices of the length-sorted batch gave the last rank
    the longest sequences: under DDP every step waited for it.)"""
    import heapq

    per_rank = len(lengths) // world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    open_ranks = [(0, rank) for rank in range(world_size)]  # (tokens so far, rank): a heap
    for position in sorted(range(len(lengths)), key=lambda position: (-lengths[position], position)):
        if not open_ranks:
            break  # the remainder of a batch that does not split evenly (start_session refuses those)
        tokens, rank = heapq.heappop(open_ranks)
        shares[rank].append(position)
        if len(shares[rank]) < per_rank:
            heapq.heappush(open_ranks, (tokens + lengths[position], rank))
    return [sorted(share) for share in shares]


def split_for_rank(picks: list, rank: int, world_size: int, lengths: list[int] | None = None) -> list:
    """This rank's share of a global batch, in the order of `picks`: dealt by `lengths` (deal_to_ranks) when
    given, else a contiguous slice."""
    if lengths is not None and world_size > 1:
        return [picks[position] for position in deal_to_ranks(lengths, world_size)[rank]]
    per_rank = len(picks) // world_size
    return picks[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(picks: list, micro_batch_size: int) -> list[list]:
    return [picks[start : start + micro_batch_size] for start in range(0, len(picks), micro_batch_size)]


@dataclass
class StepBatching:
    """How a rank's micro-batches of each global batch are made. Pickles small (the memory-mapped shards
    are reopened by path, not copied), so loader processes can build batches from it."""

    shards_dir: Path
    spec: MaskingSpec
    seed: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    rank: int = 0
    world_size: int = 1
    # Also the index tensors of cpt.training.unpadded.unpadding_metadata per micro-batch: built here, on the host, they
    # spare the CUDA step its host-device syncs (the objective must accept them as keyword arguments).
    with_unpadding_metadata: bool = False
    # --replay-share: this share of every global batch comes from the replay train shards (RUN_DIR/replay/shards).
    replay_shards_dir: Path | None = None
    replay_share: float = 0.0
    opened_shards: ShardSet | None = field(default=None, repr=False, compare=False)
    opened_replay: ShardSet | None = field(default=None, repr=False, compare=False)

    @property
    def shards(self) -> ShardSet:
        if self.opened_shards is None:
            self.opened_shards = ShardSet(self.shards_dir, "train")
        return self.opened_shards

    @property
    def source(self) -> ShardSet | MixedShards:
        """What the picks index: the domain shards, or with replay the domain's followed by the replay's."""
        if not self.replay_share:
            return self.shards
        if self.opened_replay is None:
            self.opened_replay = ShardSet(self.replay_shards_dir, "train")
        return MixedShards(self.shards, self.opened_replay)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "opened_shards": None, "opened_replay": None}

    def global_picks(self, sampler: SamplerState) -> tuple[list[tuple[int, int]], SamplerState]:
        """The global batch at `sampler` as (epoch, index into `source`) picks, and the next sampler state."""
        source = self.source
        if isinstance(source, MixedShards):
            return next_mixed_batch(sampler, num_sequences=source.boundary, num_replay=len(source.replay),
                                    count=self.global_batch_size, share=self.replay_share, seed=self.seed)
        return next_global_batch(sampler, num_sequences=len(source), count=self.global_batch_size, seed=self.seed)

    def next_sampler(self, sampler: SamplerState) -> SamplerState:
        return self.global_picks(sampler)[1]

    def build(self, sampler: SamplerState) -> tuple[list[dict[str, torch.Tensor]], SamplerState]:
        """This rank's masked, padded micro-batches of the global batch at `sampler`, and the next sampler
        state. A pure function of `sampler`, so any process can build any step."""
        shards = self.source
        picks, next_sampler = self.global_picks(sampler)
        # Sequences of similar length share a micro-batch so padding costs less; the update is a sum over the
        # whole global batch, so the grouping does not change it.
        picks = sorted(picks, key=lambda pick: shards.length(pick[1]))
        # Each rank gets a similar number of tokens (the step waits for the slowest), still in length order.
        mine = split_for_rank(picks, self.rank, self.world_size, lengths=[shards.length(index) for _, index in picks])
        batches = [build_batch(shards, chunk, self.spec, self.seed, max_width=self.seq_length)
                   for chunk in micro_batches(mine, self.micro_batch_size)]
        if self.with_unpadding_metadata:
            from cpt.training.unpadded import unpadding_metadata

            batches = [{**batch, **unpadding_metadata(batch["attention_mask"], batch["labels"])} for batch in batches]
        return batches, next_sampler


class StepBatchStream(torch.utils.data.IterableDataset):
    """`steps` steps' (packed micro-batches, next sampler) from `sampler` on, in order. With N DataLoader
    workers, worker i builds steps i, i + N, ... and the loader hands them out round-robin: the same order."""

    def __init__(self, batching: StepBatching, sampler: SamplerState, steps: int):
        self.batching, self.sampler, self.steps = batching, sampler, steps

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        sampler = self.sampler
        for step in range(self.steps):
            if step % workers == worker_id:
                batches, next_sampler = self.batching.build(sampler)
                yield pack_batches(batches), next_sampler
            else:
                next_sampler = self.batching.next_sampler(sampler)
            sampler = next_sampler


def pack_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, list[tuple[int, ...]]]]:
    """One flat tensor per key (and the micro-batches' shapes): a step crosses from a loader process in 3
    shared-memory handles, not 3 per micro-batch (hundreds would run into the open-files limit)."""
    return {key: (torch.cat([batch[key].reshape(-1) for batch in batches]), [tuple(batch[key].shape) for batch in batches])
            for key in batches[0]}


def unpack_batches(packed: dict[str, tuple[torch.Tensor, list[tuple[int, ...]]]]) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of `pack_batches`, as views of its flat tensors (pinned stays pinned)."""
    per_key = {}
    for key, (flat, shapes) in packed.items():
        sizes = [math.prod(shape) for shape in shapes]
        per_key[key] = [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]
    return [dict(zip(per_key, values, strict=True)) for values in zip(*per_key.values(), strict=True)]


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_held_back():
    """Hold back SIGINT and SIGTERM while loader processes start: they inherit them blocked. A Ctrl-C (sent
    to the terminal's process group) or torchrun's SIGTERM (sent to each rank's group) then reaches only the
    trainer, which finishes its step and checkpoints, instead of killing the loaders under it; the
    loaders end when the trainer stops them or exits. A signal that comes meanwhile reaches the trainer
    when this ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Python's resource tracker, started with the first spawned process, unblocks these signals once it
    # is up (multiprocessing/resource_tracker.py): start it first, so it cannot undo the block.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _hold_back_stop_signals_in_worker(_worker_id: int) -> None:
    """worker_init_fn: make sure a loader process keeps them held back, whatever its start inherited."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class BatchFeed:
    """Each step's batches in order for the training loop: built ahead by `workers` loader processes (torch
    DataLoader; pinned for the copy to the GPU when `pin_memory`), or in line when `workers` is 0.
    `wait_s` adds up the seconds the loop waited for them (starting the loaders included): near 0 when
    the loader keeps up."""

    def __init__(self, batching: StepBatching, sampler: SamplerState, *, workers: int, steps: int,
                 pin_memory: bool = False):
        started = time.perf_counter()
        self.batching, self._sampler = batching, sampler
        self._loader = None
        if workers > 0 and steps > 0:
            # spawn, not fork: the trainer has threads (and maybe CUDA) by now; batches come back through
            # shared memory, the order is kept (see StepBatchStream).
            loader = torch.utils.data.DataLoader(
                StepBatchStream(batching, sampler, steps), batch_size=None, num_workers=min(workers, steps),
                pin_memory=pin_memory, prefetch_factor=2, multiprocessing_context="spawn",
                worker_init_fn=_hold_back_stop_signals_in_worker)
            with stop_signals_held_back():
                self._loader = iter(loader)
        self.wait_s = time.perf_counter() - started

    def next_step(self) -> tuple[list[dict[str, torch.Tensor]], SamplerState]:
        """The next step's (micro-batches, sampler state after them)."""
        started = time.perf_counter()
        if self._loader is None:
            prepared = self.batching.build(self._sampler)
        else:
            packed, next_sampler = next(self._loader)
            prepared = unpack_batches(packed), next_sampler
        self._sampler = prepared[1]
        self.wait_s += time.perf_counter() - started
        return prepared

    def close(self) -> None:
        """Stop the loader processes (also when training stops early)."""
        loader, self._loader = self._loader, None
        if loader is not None:
            loader._shutdown_workers()  # what the iterator's __del__ does; explicit, so it happens now

    def __enter__(self) -> BatchFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

