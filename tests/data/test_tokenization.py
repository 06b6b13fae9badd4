"""Tests for cpt.data.tokenization (`cpt tokenize`): tokenizer loading, word-start flags, cutting and packing,
the shard round trip, identical output for any worker count, per-chunk resume, manifest counts.

Stages run in-process with workers=1 (and once with 2); CHUNK_BYTES is made small with monkeypatch
so the 60-document corpus spans several chunks (ranges are computed in the parent process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_CORPUS, cpt_command

from cpt.common.base_model import load_tokenizer
from cpt.config import PrepareConfig, TokenizeConfig
from cpt.data import tokenization
from cpt.data.prepare import prepare_corpus
from cpt.data.segment import load_segmenter
from cpt.data.shards import ShardSet
from cpt.data.tokenization import build_sequences, cut_points, tokenize_corpus, tokenize_documents
from cpt.errors import BadInput

VOCAB = Path(__file__).resolve().parents[2] / "cpt" / "assets" / "zh_vocab.txt"
CLS, SEP, UNK = 101, 102, 100


def write_vocab_only_base(path: Path, **config) -> Path:
    """A base model dir with only vocab.txt and config.json (no tokenizer.json, no weights)."""
    path.mkdir(parents=True)
    (path / "vocab.txt").write_bytes(VOCAB.read_bytes())
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 21128,
                                                  "max_position_embeddings": 128, **config}))
    return path


@pytest.fixture(scope="module")
def vocab_only_base(tmp_path_factory) -> Path:
    return write_vocab_only_base(tmp_path_factory.mktemp("tok") / "base")


@pytest.fixture(scope="module")
def tokenizer(vocab_only_base):
    return load_tokenizer(vocab_only_base)


@pytest.fixture(scope="module")
def jieba_segment():
    return load_segmenter("jieba")


@pytest.fixture
def prepared_run(tmp_path, small_corpus) -> Path:
    run_dir = tmp_path / "run"
    prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(small_corpus),), val_fraction=0.1))
    return run_dir


def tokenize(run_dir: Path, base: Path, **settings) -> dict:
    return tokenize_corpus(TokenizeConfig(output=run_dir, base_model=base, **{"max_seq_length": 64, "workers": 1,
                                                                             **settings}))


def shard_files(run_dir: Path) -> dict[str, bytes]:
    shards = run_dir / "shards"
    return {str(path.relative_to(shards)): path.read_bytes()
            for path in sorted(shards.rglob("*")) if path.is_file() and path.name != "manifest.json"}


# --- loading the tokenizer -------------------------------------------------------------------------------


def test_tokenizer_from_vocab_and_config_only(tokenizer):
    assert len(tokenizer) == 21128
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id) == (CLS, SEP, UNK)


def sample_texts(count: int = 400) -> list[str]:
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:count]
    return lines + ["Hello WORLD café naïve ÀÉ 3.5mm HR-V “quoted” \u200b x\ty", "ＡＢＣ１２３ 全角", ""]


FORMS = ["vocab.txt", "tokenizer.json", "cased vocab.txt", "uncased tokenizer.json + cased config",
         "vocab.txt + added_tokens.json"]


@pytest.mark.parametrize("form", FORMS)
def test_ids_equal_transformers_autotokenizer(tmp_path, form):
    """cpt loads the tokenizer without transformers (3 CPU-s of imports); the ids must be AutoTokenizer's."""
    from transformers import AutoTokenizer

    base = write_vocab_only_base(tmp_path / "base")
    if "tokenizer.json" in form:
        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(base))
        (base / "vocab.txt").unlink()
    if "cased" in form.replace("uncased", ""):
        # transformers' BERT tokenizer takes do_lower_case from tokenizer_config.json even over tokenizer.json
        (base / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    if "added_tokens.json" in form:
        (base / "added_tokens.json").write_text(json.dumps({"[NEW1]": 21128, "新词汇": 21129}))
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "vocab_size": 21130}))
    reference = AutoTokenizer.from_pretrained(str(base))
    reference.backend_tokenizer.encode_special_tokens = True
    texts = sample_texts() + ["CASE Matters 新词汇 [NEW1] here"]
    expected = [encoding.ids for encoding in reference.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    ours = load_tokenizer(base)
    assert [encoding.ids for encoding in ours.encode_batch(texts)] == expected
    assert sorted(ours.all_special_ids) == sorted(reference.all_special_ids)
    assert (ours.cls_token_id, ours.sep_token_id, ours.mask_token_id, ours.pad_token_id, ours.unk_token_id) == (
        reference.cls_token_id, reference.sep_token_id, reference.mask_token_id, reference.pad_token_id,
        reference.unk_token_id)
    truncated = reference(texts[:50], truncation=True, max_length=16)["input_ids"]
    assert ours.encode_with_specials(texts[:50], 16) == truncated


def test_fingerprint_follows_what_decides_the_ids(tmp_path):
    base = write_vocab_only_base(tmp_path / "base")
    cased = write_vocab_only_base(tmp_path / "cased")
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    renamed = write_vocab_only_base(tmp_path / "renamed")
    (renamed / "special_tokens_map.json").write_text(json.dumps({"cls_token": {"content": "[CLS]"}}))
    fingerprints = {name: tokenization.tokenizer_fingerprint(load_tokenizer(path))
                    for name, path in [("base", base), ("cased", cased), ("renamed", renamed)]}
    assert fingerprints["base"] != fingerprints["cased"]
    assert fingerprints["base"] == fingerprints["renamed"]  # the same tokens, spelled as a dict
    moved = write_vocab_only_base(tmp_path / "moved")
    (moved / "special_tokens_map.json").write_text(json.dumps({"mask_token": "[unused1]"}))
    assert tokenization.tokenizer_fingerprint(load_tokenizer(moved)) != fingerprints["base"], "[MASK] id changed"


def test_tokenize_does_not_import_transformers(tmp_path, prepared_run, vocab_only_base):
    code = ("import sys; from pathlib import Path; from cpt.config import TokenizeConfig; "
            "from cpt.data.tokenization import tokenize_corpus; "
            f"tokenize_corpus(TokenizeConfig(output=Path({str(prepared_run)!r}), base_model=Path({str(vocab_only_base)!r}), "
            "max_seq_length=64, workers=1)); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_vocab_size_mismatch_is_bad_input(tmp_path):
    base = write_vocab_only_base(tmp_path / "base", vocab_size=21000)
    with pytest.raises(BadInput, match="21128 tokens but config.json vocab_size is 21000"):
        load_tokenizer(base)


def test_base_model_dir_problems_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such directory"):
        load_tokenizer(tmp_path / "missing")
    no_tokenizer = write_vocab_only_base(tmp_path / "no-tokenizer")
    (no_tokenizer / "vocab.txt").unlink()
    with pytest.raises(BadInput, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(no_tokenizer)
    no_config = write_vocab_only_base(tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(BadInput, match="no config.json"):
        load_tokenizer(no_config)


def test_max_seq_length_above_max_position_embeddings(prepared_run, vocab_only_base):
    with pytest.raises(BadInput, match="--max-seq-length 256 exceeds .* max_position_embeddings 128"):
        tokenize(prepared_run, vocab_only_base, max_seq_length=256)


# --- word-start flags on hand-checked sentences -----------------------------------------------------------

HAND_CHECKED = [
    # jieba: 我/爱/北京/天安门
    ("我爱北京天安门", ["我", "爱", "北", "京", "天", "安", "门"], [1, 1, 1, 0, 1, 0, 0]),
    # jieba: 我/喜欢/playing/足球; WordPiece: play ##ing -> one start
    ("我喜欢playing足球", ["我", "喜", "欢", "play", "##ing", "足", "球"], [1, 1, 0, 1, 0, 1, 0]),
    # jieba: 他/在/2019/年/12/月/31/日/出生 (digits and 年/月/日 are separate words)
    ("他在2019年12月31日出生", ["他", "在", "2019", "年", "12", "月", "31", "日", "出", "生"], [1] * 9 + [0]),
    ("Transformers很好用", ["t", "##ran", "##s", "##form", "##ers", "很", "好", "用"], [1, 0, 0, 0, 0, 1, 1, 1]),
    # Spaces (ASCII and ideographic) are jieba words of their own but have no token.
    ("我 爱\u3000北京", ["我", "爱", "北", "京"], [1, 1, 1, 0]),
    # A character missing from the vocab stays one [UNK] token and keeps its word boundary.
    ("天安门𠀀广场", ["天", "安", "门", "[UNK]", "广", "场"], [1, 0, 0, 1, 1, 0]),
    # jieba: HR/-/V/的/油耗/是/6.5/L; the token "5l" starts inside the word 6.5, so it starts none.
    ("HR-V的油耗是6.5L", ["hr", "-", "v", "的", "油", "耗", "是", "6", ".", "5l"], [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]),
]


@pytest.mark.parametrize("backend", ["jieba", "rjieba"])
def test_word_start_flags_on_hand_checked_sentences(backend, tokenizer, request):
    segment = request.getfixturevalue("jieba_segment") if backend == "jieba" else load_segmenter("rjieba")
    documents = tokenize_documents([text for text, _, _ in HAND_CHECKED], tokenizer, segment)
    for (text, tokens, flags), (ids, starts) in zip(HAND_CHECKED, documents, strict=True):
        assert tokenizer.convert_ids_to_tokens(ids.tolist()) == tokens, text
        assert starts.astype(int).tolist() == flags, text
        assert ids.dtype == np.int64 and starts.dtype == bool


def test_literal_special_tokens_in_text_are_text(tokenizer, jieba_segment):
    (ids, _starts), = tokenize_documents(["他说[SEP]和[MASK]及[CLS]"], tokenizer, jieba_segment)
    assert not set(ids.tolist()) & set(tokenizer.all_special_ids)


# --- cutting and packing -----------------------------------------------------------------------------------


def test_cut_points_cut_before_word_starts():
    three_token_words = np.tile([True, False, False], 7)  # 21 tokens, words start at 0, 3, 6, ...
    assert cut_points(three_token_words, 8) == [0, 6, 12, 18]
    assert cut_points(np.tile([True, False], 10), 8) == [0, 8, 16]  # the last word start in the window wins
    one_long_word = np.zeros(20, dtype=bool)
    one_long_word[0] = True
    assert cut_points(one_long_word, 8) == [0, 8, 16]  # a word longer than half a sequence is split
    # A word start only in the first half of the window is not used: the piece must be > half a sequence.
    early_start = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    assert cut_points(early_start, 8) == [0, 8]
    assert cut_points(np.ones(8, dtype=bool), 8) == [0]


def make_doc(first_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(first_id, first_id + length, dtype=np.int64), np.ones(length, dtype=bool)


def test_build_sequences_one_document_a_sequence_and_packed():
    docs = [make_doc(1000, 2), make_doc(2000, 2), make_doc(3000, 2), make_doc(4000, 5), make_doc(5000, 0)]
    ids, starts, offsets = build_sequences(docs, max_seq_length=10, pack=False, cls_id=CLS, sep_id=SEP)
    assert offsets.tolist() == [0, 4, 8, 12, 19]
    assert ids[:4].tolist() == [CLS, 1000, 1001, SEP]
    assert starts.tolist()[:4] == [False, True, True, False]

    ids, starts, offsets = build_sequences(docs, max_seq_length=10, pack=True, cls_id=CLS, sep_id=SEP)
    assert offsets.tolist() == [0, 10, 17]
    assert ids[:10].tolist() == [CLS, 1000, 1001, SEP, 2000, 2001, SEP, 3000, 3001, SEP]
    assert ids[10:].tolist() == [CLS, 4000, 4001, 4002, 4003, 4004, SEP]
    assert not starts[ids == CLS].any() and not starts[ids == SEP].any()

    # 1 + (2 + 1) + (2 + 1) + (3 + 1) = 11 tokens would not fit: the third document opens a new sequence.
    _ids, _starts, offsets = build_sequences([make_doc(1, 2), make_doc(5, 2), make_doc(9, 3)], max_seq_length=10,
                                             pack=True, cls_id=CLS, sep_id=SEP)
    assert offsets.tolist() == [0, 7, 12]

    ids, _starts, offsets = build_sequences([make_doc(1000, 20)], max_seq_length=10, pack=False, cls_id=CLS, sep_id=SEP)
    assert np.diff(offsets).tolist() == [10, 10, 6]
    assert np.diff(offsets).max() <= 10
    empty_ids, _, empty_offsets = build_sequences([], max_seq_length=10, pack=True, cls_id=CLS, sep_id=SEP)
    assert len(empty_ids) == 0 and empty_offsets.tolist() == [0]


# --- the whole stage ---------------------------------------------------------------------------------------


def sequences(run_dir: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    shards = ShardSet(run_dir / "shards", split)
    return [shards.sequence(index) for index in range(len(shards))]


def documents_of(run_dir: Path, split: str) -> list[str]:
    return (run_dir / "corpus" / f"{split}.txt").read_text(encoding="utf-8").splitlines()


def decoded_matches(tokenizer, ids: list[int], text: str) -> bool:
    """Do `ids` spell `text` modulo the tokenizer's normalisation (lowercase, no whitespace), [UNK] = any chars?"""
    pieces = [token.removeprefix("##") for token in tokenizer.convert_ids_to_tokens(ids)]
    decoded = "".join(pieces)
    expected = "".join(text.lower().split())
    pattern = ".+?".join(re.escape(part) for part in decoded.split("[UNK]"))
    return re.fullmatch(pattern, expected, flags=re.DOTALL) is not None


def test_shards_round_trip_the_corpus(prepared_run, tiny_base, tokenizer):
    manifest = tokenize(prepared_run, tiny_base)
    for split in ("train", "val"):
        texts = documents_of(prepared_run, split)
        stream = sequences(prepared_run, split)
        assert stream, split
        for ids, starts in stream:
            assert len(ids) <= 64
            assert ids[0] == CLS and ids[-1] == SEP
            assert not np.isin(ids[1:-1], [CLS, SEP]).any()  # one document piece a sequence
            assert not starts[0] and not starts[-1]
            assert starts[1], "each piece starts at a word start (cuts are placed before one)"
        bodies = np.concatenate([ids[1:-1] for ids, _ in stream])
        expected = tokenize_documents(texts, tokenizer, load_segmenter("auto"))
        np.testing.assert_array_equal(bodies, np.concatenate([doc_ids for doc_ids, _ in expected]))
        np.testing.assert_array_equal(np.concatenate([starts[1:-1] for _, starts in stream]),
                                      np.concatenate([doc_starts for _, doc_starts in expected]))
        assert decoded_matches(tokenizer, bodies.tolist(), "".join(texts))

        counts = manifest["splits"][split]
        assert counts["documents"] == len(texts)
        assert counts["chars"] == sum(len(text) for text in texts)
        assert counts["sequences"] == len(stream)
        assert counts["tokens"] == sum(len(ids) for ids, _ in stream)
        assert counts["body_tokens"] == len(bodies) == counts["tokens"] - 2 * counts["sequences"]
        assert counts["unk_tokens"] == int((bodies == UNK).sum())
        assert counts["words"] == sum(int(starts.sum()) for _, starts in stream)
        assert counts["unk_share"] == pytest.approx(counts["unk_tokens"] / counts["body_tokens"])
        assert counts["mean_word_tokens"] == pytest.approx(counts["body_tokens"] / counts["words"])
        assert 1.0 < counts["mean_word_tokens"] < 2.5  # Chinese words are 1-2 characters, mostly
    train = manifest["splits"]["train"]
    assert train["sequences"] > train["documents"], "some 64-token sequences hold pieces of a long document"
    assert manifest["vocab_size"] == 21128 and manifest["id_dtype"] == "uint16"
    ids_bytes = sum(path.stat().st_size for path in (prepared_run / "shards" / "train").glob("*.tokens.bin"))
    assert ids_bytes == 2 * train["tokens"]


def test_pack_documents_fills_sequences(tmp_path, tiny_base):
    sentences = [s for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:40] for s in line.split("。")]
    corpus = tmp_path / "sentences.txt"
    corpus.write_text("\n".join(s for s in sentences if 10 <= len(s) <= 40) + "\n", encoding="utf-8")
    runs = {}
    for pack in (False, True):
        run_dir = tmp_path / f"run-{pack}"
        prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(corpus),), val_fraction=0.05))
        manifest = tokenize(run_dir, tiny_base, max_seq_length=128, pack_documents=pack)
        runs[pack] = (manifest["splits"]["train"], sequences(run_dir, "train"))
    (single, single_seqs), (packed, packed_seqs) = runs[False], runs[True]
    assert packed["documents"] == single["documents"] > 50
    assert packed["sequences"] < single["sequences"] / 3
    separators = [int((ids == SEP).sum()) for ids, _ in packed_seqs]
    assert sum(separators) == single["sequences"]  # every document piece ends with [SEP]
    assert max(separators) > 3
    assert all(len(ids) <= 128 and ids[0] == CLS and ids[-1] == SEP for ids, _ in packed_seqs)
    assert np.diff(ShardSet(tmp_path / "run-True" / "shards", "train").lengths()).any()
    # Packing only regroups the same pieces.
    strip = lambda stream: np.concatenate([ids[(ids != CLS) & (ids != SEP)] for ids, _ in stream])  # noqa: E731
    np.testing.assert_array_equal(strip(single_seqs), strip(packed_seqs))
    assert packed["body_tokens"] == single["body_tokens"]


def test_same_bytes_for_any_worker_count_and_resume_per_chunk(tmp_path, small_corpus, tiny_base, monkeypatch):
    monkeypatch.setattr(tokenization, "CHUNK_BYTES", 8 << 10)
    runs = []
    for workers in (1, 2):
        run_dir = tmp_path / f"run-{workers}"
        prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(small_corpus),), val_fraction=0.1))
        manifest = tokenize(run_dir, tiny_base, workers=workers)
        runs.append((run_dir, manifest))
    (one, one_manifest), (two, two_manifest) = runs
    assert len(one_manifest["splits"]["train"]["chunks"]) >= 4
    assert shard_files(one) == shard_files(two)
    assert one_manifest["splits"] == two_manifest["splits"]

    # Nothing to do on a rerun: no file is rewritten.
    train_dir = two / "shards" / "train"
    for path in [*train_dir.iterdir(), two / "shards" / "manifest.json"]:
        os.utime(path, ns=(10**18, 10**18))  # back-dated, so a rewrite shows even on a coarse clock
    mtimes = {path.name: path.stat().st_mtime_ns for path in train_dir.iterdir()}
    manifest_mtime = (two / "shards" / "manifest.json").stat().st_mtime_ns
    assert tokenize(two, tiny_base, workers=2) == two_manifest
    assert {path.name: path.stat().st_mtime_ns for path in train_dir.iterdir()} == mtimes
    assert (two / "shards" / "manifest.json").stat().st_mtime_ns == manifest_mtime

    # A chunk whose offsets file is gone (killed mid-write) is redone; the others are kept as they are.
    (train_dir / "chunk-00001.offsets.npy").unlink()
    assert tokenize(two, tiny_base, workers=2)["splits"] == one_manifest["splits"]
    assert shard_files(two) == shard_files(one)
    after = {path.name: path.stat().st_mtime_ns for path in train_dir.iterdir()}
    assert after["chunk-00001.tokens.bin"] != mtimes["chunk-00001.tokens.bin"]
    assert {name: t for name, t in after.items() if "00001" not in name} == {
        name: t for name, t in mtimes.items() if "00001" not in name}


def test_changed_settings_redo_the_shards(prepared_run, tiny_base):
    first = tokenize(prepared_run, tiny_base)
    second = tokenize(prepared_run, tiny_base, max_seq_length=32)
    assert second["request"] != first["request"]
    assert second["splits"]["train"]["sequences"] > first["splits"]["train"]["sequences"]
    assert max(ShardSet(prepared_run / "shards", "train").lengths()) <= 32


def test_unk_share_above_one_percent_warns(tmp_path, tiny_base, capsys):
    corpus = tmp_path / "rare.txt"
    corpus.write_text("".join(f"这是第{i}篇文档，其中有生僻字𠀀𠀁𠀂㐀㐁。\n" for i in range(30)), encoding="utf-8")
    run_dir = tmp_path / "run"
    prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(corpus),), val_fraction=0.1))
    capsys.readouterr()
    manifest = tokenize(run_dir, tiny_base)
    unk_share = manifest["splits"]["train"]["unk_share"]
    assert unk_share == pytest.approx(5 / 20, abs=0.05)
    err = " ".join(capsys.readouterr().err.split())
    assert "warning:" in err and "of tokens are [UNK] (> 1%)" in err


def test_no_unk_warning_on_ordinary_text(tmp_path, tiny_base, capsys):
    corpus = tmp_path / "plain.txt"
    corpus.write_text("".join(f"这是第{i}篇普通的新闻文档，记者从北京报道。\n" for i in range(30)), encoding="utf-8")
    run_dir = tmp_path / "run"
    prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(corpus),), val_fraction=0.1))
    capsys.readouterr()
    assert tokenize(run_dir, tiny_base)["splits"]["train"]["unk_share"] == 0
    assert "(> 1%)" not in capsys.readouterr().err


def test_cli_tokenize_with_a_missing_base_model_exits_3(prepared_run, tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run([*cpt_command(), "tokenize", "--output", str(prepared_run), "--base-model", str(missing)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines() == [f"cpt: error: --base-model {missing}: no such directory; "
                                                  "point it at a Hugging Face model dir"]
