"""Tests for cpt.shards: the on-disk chunk format, bit-packed flags and the memory-mapped reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpt.shards import ShardSet, chunk_is_complete, chunk_name, id_dtype, unpack_flags, write_chunk


def test_id_dtype_is_uint16_below_65536_entries():
    assert id_dtype(21128) == np.uint16
    assert id_dtype(65535) == np.uint16
    assert id_dtype(65536) == np.uint32
    assert id_dtype(250002) == np.uint32


def test_unpack_flags_matches_a_slice_at_any_bit_offset():
    rng = np.random.default_rng(0)
    flags = rng.random(203) < 0.4
    packed = np.packbits(flags)
    for start in range(0, 40):
        for length in (0, 1, 5, 7, 8, 9, 16, 17, 63, 203 - start):
            np.testing.assert_array_equal(unpack_flags(packed, start, length), flags[start : start + length])
    assert unpack_flags(packed, 195, 8).dtype == bool


def write_sequences(split_dir, index: int, sequences: list[tuple[list[int], list[bool]]], dtype=np.uint16) -> None:
    ids = np.concatenate([np.asarray(s_ids, dtype=dtype) for s_ids, _ in sequences]) if sequences else np.zeros(0, dtype)
    starts = np.concatenate([np.asarray(s, dtype=bool) for _, s in sequences]) if sequences else np.zeros(0, bool)
    offsets = np.concatenate(([0], np.cumsum([len(s_ids) for s_ids, _ in sequences]))).astype(np.int64)
    write_chunk(split_dir, chunk_name(index), ids, starts, offsets)


def random_sequences(rng: np.random.Generator, count: int, vocab: int) -> list[tuple[list[int], list[bool]]]:
    sequences = []
    for _ in range(count):
        length = int(rng.integers(3, 40))  # odd lengths put sequence boundaries at every bit offset
        sequences.append((rng.integers(0, vocab, size=length).tolist(), (rng.random(length) < 0.5).tolist()))
    return sequences


def test_shardset_reads_sequences_across_chunks(tmp_path):
    rng = np.random.default_rng(1)
    split_dir = tmp_path / "shards" / "train"
    split_dir.mkdir(parents=True)
    chunks = [random_sequences(rng, 5, 21128), [], random_sequences(rng, 1, 21128), random_sequences(rng, 7, 21128)]
    for index, sequences in enumerate(chunks):
        write_sequences(split_dir, index, sequences)
    manifest = {"id_dtype": "uint16", "splits": {"train": {"chunks": [chunk_name(i) for i in range(len(chunks))]}}}
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))

    shards = ShardSet(tmp_path / "shards", "train")
    expected = [sequence for sequences in chunks for sequence in sequences]
    assert len(shards) == len(expected) == 13
    for index, (want_ids, want_starts) in enumerate(expected):
        ids, starts = shards.sequence(index)
        assert ids.dtype == np.int64 and starts.dtype == bool
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(starts, want_starts)
        assert shards.length(index) == len(want_ids)
    np.testing.assert_array_equal(shards.lengths(), [len(ids) for ids, _ in expected])
    for bad in (-1, len(expected)):
        with pytest.raises(IndexError):
            shards.sequence(bad)


def test_uint32_ids_round_trip(tmp_path):
    split_dir = tmp_path / "shards" / "val"
    split_dir.mkdir(parents=True)
    write_sequences(split_dir, 0, [([101, 70000, 250001, 102], [False, True, False, False])], dtype=np.uint32)
    manifest = {"id_dtype": "uint32", "splits": {"val": {"chunks": [chunk_name(0)]}}}
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    ids, starts = ShardSet(tmp_path / "shards", "val").sequence(0)
    assert ids.tolist() == [101, 70000, 250001, 102]
    assert starts.tolist() == [False, True, False, False]


def test_write_chunk_layout_and_completion_marker(tmp_path):
    ids = np.array([101, 5, 6, 102, 101, 7, 102], dtype=np.uint16)
    starts = np.array([0, 1, 0, 0, 0, 1, 0], dtype=bool)
    offsets = np.array([0, 4, 7])
    assert not chunk_is_complete(tmp_path, "chunk-00003")
    write_chunk(tmp_path, "chunk-00003", ids, starts, offsets)
    assert chunk_is_complete(tmp_path, "chunk-00003")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "chunk-00003.ids.bin", "chunk-00003.offsets.npy", "chunk-00003.starts.bin"]  # no temp files left
    assert (tmp_path / "chunk-00003.ids.bin").stat().st_size == 2 * len(ids)  # uint16 on disk
    assert (tmp_path / "chunk-00003.starts.bin").read_bytes() == np.packbits(starts).tobytes()
    assert np.load(tmp_path / "chunk-00003.offsets.npy").dtype == np.int64
