"""Tests for cpt.data.shards: the on-disk chunk format (ids with the word-start bit folded in) and the
memory-mapped reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpt.data.shards import (
    SHARD_FORMAT,
    ShardSet,
    chunk_is_complete,
    chunk_name,
    id_dtype,
    pack_tokens,
    unpack_tokens,
    write_chunk,
)
from cpt.errors import BadInput


def test_id_dtype_leaves_the_top_bit_for_the_word_start_flag():
    assert id_dtype(21128) == np.uint16
    assert id_dtype(32768) == np.uint16
    assert id_dtype(32769) == np.uint32
    assert id_dtype(250002) == np.uint32


@pytest.mark.parametrize("vocab_size", [21128, 32768, 250002])
def test_pack_unpack_round_trip_keeps_every_id_and_flag(vocab_size):
    rng = np.random.default_rng(0)
    ids = np.concatenate(([0, vocab_size - 1], rng.integers(0, vocab_size, size=500)))
    starts = rng.random(len(ids)) < 0.5
    words = pack_tokens(ids, starts, id_dtype(vocab_size))
    assert words.dtype == id_dtype(vocab_size)
    got_ids, got_starts = unpack_tokens(words)
    assert got_ids.dtype == np.int64 and got_starts.dtype == bool
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_starts, starts)


def write_sequences(split_dir, index: int, sequences: list[tuple[list[int], list[bool]]], dtype=np.uint16) -> None:
    ids = np.concatenate([np.asarray(s_ids, dtype=np.int64) for s_ids, _ in sequences]) if sequences else np.zeros(0, int)
    starts = np.concatenate([np.asarray(s, dtype=bool) for _, s in sequences]) if sequences else np.zeros(0, bool)
    offsets = np.concatenate(([0], np.cumsum([len(s_ids) for s_ids, _ in sequences]))).astype(np.int64)
    write_chunk(split_dir, chunk_name(index), ids, starts, offsets, np.dtype(dtype))


def write_manifest(shards_dir, split: str, chunks: int, dtype: str) -> None:
    manifest = {"shard_format": SHARD_FORMAT, "id_dtype": dtype,
                "splits": {split: {"chunks": [chunk_name(i) for i in range(chunks)]}}}
    (shards_dir / "manifest.json").write_text(json.dumps(manifest))


def random_sequences(rng: np.random.Generator, count: int, vocab: int) -> list[tuple[list[int], list[bool]]]:
    sequences = []
    for _ in range(count):
        length = int(rng.integers(3, 40))
        sequences.append((rng.integers(0, vocab, size=length).tolist(), (rng.random(length) < 0.5).tolist()))
    return sequences


def test_shardset_reads_sequences_across_chunks(tmp_path):
    rng = np.random.default_rng(1)
    split_dir = tmp_path / "shards" / "train"
    split_dir.mkdir(parents=True)
    chunks = [random_sequences(rng, 5, 21128), [], random_sequences(rng, 1, 21128), random_sequences(rng, 7, 21128)]
    for index, sequences in enumerate(chunks):
        write_sequences(split_dir, index, sequences)
    write_manifest(tmp_path / "shards", "train", len(chunks), "uint16")

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
    write_manifest(tmp_path / "shards", "val", 1, "uint32")
    ids, starts = ShardSet(tmp_path / "shards", "val").sequence(0)
    assert ids.tolist() == [101, 70000, 250001, 102]
    assert starts.tolist() == [False, True, False, False]


def test_shards_of_an_older_format_are_refused_with_the_fix(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"id_dtype": "uint16", "splits": {}}))
    with pytest.raises(BadInput, match=r"another cpt version \(shard format 1.*rerun `cpt tokenize`"):
        ShardSet(tmp_path / "shards", "train")


def test_write_chunk_layout_and_completion_marker(tmp_path):
    ids = np.array([101, 5, 6, 102, 101, 7, 102])
    starts = np.array([0, 1, 0, 0, 0, 1, 0], dtype=bool)
    offsets = np.array([0, 4, 7])
    assert not chunk_is_complete(tmp_path, "chunk-00003")
    write_chunk(tmp_path, "chunk-00003", ids, starts, offsets, np.dtype(np.uint16))
    assert chunk_is_complete(tmp_path, "chunk-00003")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "chunk-00003.offsets.npy", "chunk-00003.tokens.bin"]  # no temp files left
    words = np.fromfile(tmp_path / "chunk-00003.tokens.bin", dtype=np.uint16)  # 2 bytes per token on disk
    assert words.tolist() == [101, 5 | 0x8000, 6, 102, 101, 7 | 0x8000, 102]
    assert np.load(tmp_path / "chunk-00003.offsets.npy").dtype == np.int32
