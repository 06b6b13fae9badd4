"""The on-disk format of tokenized data, and a memory-mapped reader for it.

RUN_DIR/shards/{train,val}/ holds two files per input chunk (format 2):

    chunk-00000.tokens.bin   one word per token, every sequence back to back, [CLS] ... [SEP] included:
                             the token id in the low bits, the word-start flag (1 = the token starts a
                             jieba word) in the top bit; uint16 when the vocab has <= 32768 entries, else uint32
    chunk-00000.offsets.npy  (S + 1,) int32 (int64 past 2**31 tokens): sequence s is tokens[offsets[s]:offsets[s + 1]]

No padding is stored: sequences keep their own lengths and batches pad (or unpad) later.
The offsets file is written last, so a chunk is complete exactly when it exists. Folding the flag
into the id takes 2.0 bytes per Chinese input character, against 2.17 for format 1's separate
bit file and int64 offsets (docs/benchmarks.md). A vocab of 32769-65536 entries (e.g. ERNIE's
40000) needs uint32 words: 4 bytes per token instead of about 2.1 in format 1.

    shards = ShardSet(run_dir / "shards", "train")
    ids, starts = shards.sequence(0)   # (T,) int64, (T,) bool
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpt.common.files import atomic_file, read_json, write_bytes_atomic
from cpt.errors import BadInput

SHARD_FORMAT = 2  # bump when the files change; the tokenize request carries it, so older shards are redone


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest word that holds every id below vocab_size plus the word-start bit."""
    if vocab_size <= 1 << 15:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.uint32)
    raise BadInput(f"a vocab of {vocab_size} tokens does not fit the shard format (at most 2**31 tokens)")


def start_bit(dtype: np.dtype) -> int:
    return 1 << (np.dtype(dtype).itemsize * 8 - 1)


def pack_tokens(ids: np.ndarray, starts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Ids with each word-start flag in the top bit. (N,) dtype"""
    words = np.asarray(ids).astype(dtype)
    words[np.asarray(starts, dtype=bool)] |= dtype.type(start_bit(dtype))
    return words


def unpack_tokens(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64, word-start flags (N,) bool) of packed token words."""
    flag = start_bit(words.dtype)
    words = np.asarray(words, dtype=np.int64)
    return words & (flag - 1), (words & flag) != 0


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}"


def chunk_is_complete(split_dir: Path, name: str) -> bool:
    return (Path(split_dir) / f"{name}.offsets.npy").is_file()


def write_chunk(split_dir: Path, name: str, ids: np.ndarray, starts: np.ndarray, offsets: np.ndarray,
                dtype: np.dtype) -> None:
    """Write one chunk: each file atomically (cpt.common.files), the offsets last."""
    split_dir = Path(split_dir)
    write_bytes_atomic(split_dir / f"{name}.tokens.bin", pack_tokens(ids, starts, np.dtype(dtype)).tobytes())
    offsets_dtype = np.int32 if int(offsets[-1]) < 1 << 31 else np.int64
    with atomic_file(split_dir / f"{name}.offsets.npy") as handle:
        np.save(handle, np.asarray(offsets).astype(offsets_dtype))


def require_current_format(shards_dir: Path, manifest: dict) -> None:
    if manifest and manifest.get("shard_format") != SHARD_FORMAT:
        raise BadInput(f"{shards_dir} was written by another cpt version (shard format {manifest.get('shard_format', 1)}; "
                       f"this cpt reads {SHARD_FORMAT}): rerun `cpt tokenize` (or `cpt run`) to rewrite it; checkpoints "
                       "trained on the old shards cannot be resumed (--overwrite moves them to RUN_DIR/previous-<time>/)")


class ShardSet:
    """Random access to the sequences of one split, memory-mapped (nothing loaded whole)."""

    def __init__(self, shards_dir: Path, split: str):
        manifest = read_json(Path(shards_dir) / "manifest.json") or {}
        require_current_format(Path(shards_dir), manifest)
        self.split_dir = Path(shards_dir) / split
        self.dtype = np.dtype(manifest.get("id_dtype", "uint16"))
        names = manifest.get("splits", {}).get(split, {}).get("chunks", [])
        self._tokens = []
        self._offsets = []
        sizes = []
        for name in names:
            offsets = np.load(self.split_dir / f"{name}.offsets.npy", mmap_mode="r")
            if len(offsets) < 2:
                continue
            self._tokens.append(np.memmap(self.split_dir / f"{name}.tokens.bin", dtype=self.dtype, mode="r"))
            self._offsets.append(offsets)
            sizes.append(len(offsets) - 1)
        self._first_index = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)  # (chunks + 1,)

    def __len__(self) -> int:
        return int(self._first_index[-1])

    def _locate(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = int(np.searchsorted(self._first_index, index, side="right") - 1)
        local = index - int(self._first_index[chunk])
        offsets = self._offsets[chunk]
        return chunk, int(offsets[local]), int(offsets[local + 1])

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (T,) int64 and word-start flags (T,) bool of sequence `index`."""
        chunk, start, end = self._locate(index)
        return unpack_tokens(self._tokens[chunk][start:end])

    def length(self, index: int) -> int:
        _chunk, start, end = self._locate(index)
        return end - start

    def token_counts(self, vocab_size: int, max_tokens: int) -> np.ndarray:
        """How often each id occurs in (up to max_tokens tokens of) this split, taken evenly from every
        chunk. (vocab_size,) int64"""
        counts = np.zeros(vocab_size, dtype=np.int64)
        per_chunk = max(1, max_tokens // max(len(self._tokens), 1))
        for tokens in self._tokens:
            ids, _starts = unpack_tokens(np.asarray(tokens[:per_chunk]))
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
        return counts

    def lengths(self) -> np.ndarray:
        """Every sequence's length in tokens. (N,) int64"""
        if not self._offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(np.asarray(offsets)) for offsets in self._offsets]).astype(np.int64)
