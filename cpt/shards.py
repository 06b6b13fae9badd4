"""The on-disk format of tokenized data, and a memory-mapped reader for it.

RUN_DIR/shards/{train,val}/ holds one group of three files per input chunk:

    chunk-00000.ids.bin      token ids of every sequence, back to back, [CLS] ... [SEP] included;
                             uint16 when the vocab has < 65536 entries, else uint32
    chunk-00000.starts.bin   word-start flags (1 = the token starts a jieba word), np.packbits
    chunk-00000.offsets.npy  int64 (S + 1,): sequence s is ids[offsets[s]:offsets[s + 1]]

No padding is stored: sequences keep their own lengths and batches pad (or unpad) later.
The offsets file is written last, so a chunk is complete exactly when it exists.

    shards = ShardSet(run_dir / "shards", "train")
    ids, starts = shards.sequence(0)   # (T,) int64, (T,) bool
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cpt.manifest import read_json, write_bytes_atomic


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}"


def chunk_is_complete(split_dir: Path, name: str) -> bool:
    return (Path(split_dir) / f"{name}.offsets.npy").is_file()


def write_chunk(split_dir: Path, name: str, ids: np.ndarray, starts: np.ndarray, offsets: np.ndarray) -> None:
    """Write one chunk atomically: each file to a temp name, renamed; offsets last."""
    split_dir = Path(split_dir)
    payloads = (
        (f"{name}.ids.bin", ids.tobytes()),
        (f"{name}.starts.bin", np.packbits(starts.astype(bool)).tobytes()),
    )
    for file_name, data in payloads:
        write_bytes_atomic(split_dir / file_name, data)
    tmp = split_dir / f".{name}.offsets.npy.tmp"
    with open(tmp, "wb") as handle:
        np.save(handle, offsets.astype(np.int64))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, split_dir / f"{name}.offsets.npy")


def unpack_flags(packed: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits [start, start + length) of an np.packbits array, as bool. (length,)"""
    first_byte, last_byte = start // 8, (start + length + 7) // 8
    bits = np.unpackbits(np.asarray(packed[first_byte:last_byte]))
    offset = start - first_byte * 8
    return bits[offset : offset + length].astype(bool)


class ShardSet:
    """Random access to the sequences of one split, memory-mapped (nothing loaded whole)."""

    def __init__(self, shards_dir: Path, split: str):
        manifest = read_json(Path(shards_dir) / "manifest.json") or {}
        self.split_dir = Path(shards_dir) / split
        self.dtype = np.dtype(manifest.get("id_dtype", "uint16"))
        names = manifest.get("splits", {}).get(split, {}).get("chunks", [])
        self._ids = []
        self._starts = []
        self._offsets = []
        sizes = []
        for name in names:
            offsets = np.load(self.split_dir / f"{name}.offsets.npy", mmap_mode="r")
            if len(offsets) < 2:
                continue
            self._ids.append(np.memmap(self.split_dir / f"{name}.ids.bin", dtype=self.dtype, mode="r"))
            self._starts.append(np.memmap(self.split_dir / f"{name}.starts.bin", dtype=np.uint8, mode="r"))
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
        ids = np.asarray(self._ids[chunk][start:end], dtype=np.int64)
        return ids, unpack_flags(self._starts[chunk], start, end - start)

    def length(self, index: int) -> int:
        _chunk, start, end = self._locate(index)
        return end - start

    def lengths(self) -> np.ndarray:
        """Every sequence's length in tokens. (N,) int64"""
        if not self._offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(np.asarray(offsets)) for offsets in self._offsets]).astype(np.int64)
