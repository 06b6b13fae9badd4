"""Tests for cpt.data.prepare (`cpt prepare`): input formats, cleaning, dedup, the hash split and its
stability as a corpus grows, idempotent reruns, the output-dir guard, and bad input via the real CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SAMPLE_CORPUS, cpt_command

from cpt.config import PrepareConfig
from cpt.data.prepare import clean_text, doc_hash, is_val, prepare_corpus
from cpt.errors import BadInput


def prepare(run_dir: Path, *corpus: Path | str, **settings) -> dict:
    return prepare_corpus(PrepareConfig(output=run_dir, corpus=tuple(str(path) for path in corpus), **settings))


def split_docs(run_dir: Path) -> tuple[list[str], list[str]]:
    corpus = run_dir / "corpus"
    return ([line for line in (corpus / "train.txt").read_text(encoding="utf-8").splitlines()],
            [line for line in (corpus / "val.txt").read_text(encoding="utf-8").splitlines()])


def all_docs(run_dir: Path) -> list[str]:
    train, val = split_docs(run_dir)
    return sorted(train + val)


def write(path: Path, text: str, *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def distinct_docs(count: int, start: int = 0) -> list[str]:
    return [f"第{index}篇文档：记者从北京报道，今天天气晴朗。" for index in range(start, start + count)]


def aged_mtimes(run_dir: Path) -> dict[str, int]:
    """Back-date the stage's outputs (so a rewrite shows even on a coarse clock) and return their mtimes."""
    for path in (run_dir / "corpus").iterdir():
        os.utime(path, ns=(10**18, 10**18))
    return mtimes(run_dir)


def mtimes(run_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (run_dir / "corpus").iterdir()}


# --- input formats -----------------------------------------------------------------------------------------

DOCS = ["第一篇文档，讲北京的天气。", "第二篇文档, with a comma", "第三篇文档\t讲上海"]

FORMATS = [
    ("docs.txt", "".join(f"{doc}\n" for doc in DOCS), {}),
    ("docs.txt", "第一篇文档，\n讲北京的天气。\n\n\n第二篇文档, with a comma\n \n第三篇文档\t讲上海\n",
     {"doc_separator": "blank-line"}),
    ("docs.jsonl", "\ufeff" + "".join(json.dumps({"id": i, "body": doc}, ensure_ascii=False) + "\n" for i, doc in enumerate(DOCS))
     + "\n" + json.dumps({"id": 9, "body": None}) + "\n", {"text_field": "body"}),
    ("docs.csv", "id,text,label\n" + "".join(f'{i},"{doc}",x\n' for i, doc in enumerate(DOCS)), {}),
    ("docs.csv", "\ufeffid,content,label\n" + "".join(f'{i},"{doc}",x\n' for i, doc in enumerate(DOCS)),
     {"text_column": "content"}),
    ("docs.csv", "".join(f'{i},"{doc}",正面\n' for i, doc in enumerate(DOCS)), {"text_column": "1"}),  # no header
    ("docs.tsv", "label\treview\n" + "".join(f"1\t{doc.replace(chr(9), ' ')}\n" for doc in DOCS), {}),
    ("docs.tsv", "".join(f"1\t{doc.replace(chr(9), ' ')}\n" for doc in DOCS), {}),  # no header: last column
    ("docs.tsv", "".join(f"{doc.replace(chr(9), ' ')}\t1\n" for doc in DOCS), {"text_column": "0"}),
]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(("name", "content", "settings"), FORMATS,
                         ids=["txt", "blank-line", "jsonl", "csv", "csv-name", "csv-index", "tsv", "tsv-noheader",
                              "tsv-index"])
def test_input_formats(tmp_path, name, content, settings, gz):
    path = write(tmp_path / (name + (".gz" if gz else "")), content, gz=gz)
    manifest = prepare(tmp_path / "run", path, min_chars=1, val_fraction=0.3, **settings)
    expected = sorted(clean_text(doc) for doc in DOCS)
    if name == "docs.txt" and settings.get("doc_separator") == "blank-line":
        expected = sorted(["第一篇文档， 讲北京的天气。", "第二篇文档, with a comma", "第三篇文档 讲上海"])
    assert all_docs(tmp_path / "run") == expected
    assert manifest["counts"]["train_docs"] + manifest["counts"]["val_docs"] == 3
    if name.endswith(".jsonl"):
        assert manifest["counts"]["dropped_not_text"] == 1


def test_csv_quoted_field_with_newline_and_guessed_column(tmp_path):
    path = write(tmp_path / "reviews.csv", 'id,review,stars\n1,"第一行\n第二行, 还有逗号",5\n2,"他说""好""",4\n')
    prepare(tmp_path / "run", path, min_chars=1, val_fraction=0.0)
    assert all_docs(tmp_path / "run") == sorted(["第一行 第二行, 还有逗号", '他说"好"'])


def test_directory_input_is_recursive_and_sorted(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "b.txt", "来自文件乙的一篇文档。\n")
    write(corpus / "a" / "c.jsonl", json.dumps({"text": "来自文件丙的一篇文档。"}, ensure_ascii=False) + "\n")
    write(corpus / "sub" / "z.csv.gz", "text\n来自文件己的一篇文档。\n", gz=True)
    write(corpus / ".hidden.txt", "隐藏文件不算语料的一部分。\n")
    write(corpus / "notes.md", "说明文件不算语料的一部分。\n")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    manifest = prepare(tmp_path / "run", corpus, min_chars=1)
    names = [Path(record["path"]).relative_to(corpus.resolve()).as_posix() for record in manifest["inputs"]]
    assert names == ["a/c.jsonl", "b.txt", "sub/z.csv.gz"]
    assert all_docs(tmp_path / "run") == sorted(["来自文件乙的一篇文档。", "来自文件丙的一篇文档。", "来自文件己的一篇文档。"])
    for record in manifest["inputs"]:
        assert record["bytes"] == Path(record["path"]).stat().st_size and len(record["sha256"]) == 64


def test_glob_input(tmp_path):
    write(tmp_path / "data" / "part-2.txt", "第二部分的一篇文档。\n")
    write(tmp_path / "data" / "part-1.txt", "第一部分的一篇文档。\n")
    write(tmp_path / "data" / "deep" / "part-3.txt", "第三部分的一篇文档。\n")
    write(tmp_path / "data" / "other.jsonl", json.dumps({"text": "不匹配的文档。"}, ensure_ascii=False) + "\n")
    manifest = prepare(tmp_path / "run", tmp_path / "data" / "**" / "part-*.txt", min_chars=1)
    assert [Path(record["path"]).name for record in manifest["inputs"]] == ["part-3.txt", "part-1.txt", "part-2.txt"]
    assert len(all_docs(tmp_path / "run")) == 3
    with pytest.raises(BadInput, match="the glob matches no file"):
        prepare(tmp_path / "run", tmp_path / "data" / "*.parquet")


def test_run_dir_inside_the_corpus_dir_is_not_read_as_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "".join(f"{doc}\n" for doc in distinct_docs(20)))
    run_dir = corpus / "run"
    first = prepare(run_dir, corpus, val_fraction=0.2)
    before = aged_mtimes(run_dir)
    assert prepare(run_dir, corpus, val_fraction=0.2) == first
    assert mtimes(run_dir) == before
    assert [Path(record["path"]).name for record in first["inputs"]] == ["a.txt"]


# --- cleaning, dedup, counts -------------------------------------------------------------------------------


def test_cleaning_dedup_and_counts(tmp_path):
    lines = [
        "\ufeff第一篇：开头的BOM要去掉。",
        "第二篇：控制字符\x07\x1b和零宽字符\u200b\u200c\u200d\u2060\ufeff\xad都要去掉。",
        "  第三篇：\t多个   空白\u3000\u00a0归一成一个。  ",
        "太短",
        "   ",
        "",
        "第一篇：开头的BOM要去掉。",  # duplicate of the first after the BOM is gone
        "第三篇： 多个 空白 归一成一个。",  # duplicate after whitespace is normalised
        "第四篇：正常的一篇文档，足够长。",
    ]
    path = write(tmp_path / "dirty.txt", "\r\n".join(lines) + "\r\n")
    manifest = prepare(tmp_path / "run", path, val_fraction=0.0)
    assert all_docs(tmp_path / "run") == sorted([
        "第一篇：开头的BOM要去掉。",
        "第二篇：控制字符和零宽字符都要去掉。",
        "第三篇： 多个 空白 归一成一个。",
        "第四篇：正常的一篇文档，足够长。",
    ])
    counts = manifest["counts"]
    assert counts["read_docs"] == 9
    assert counts["dropped_short"] == 1 and counts["dropped_empty"] == 2 and counts["duplicates"] == 2
    assert counts["train_docs"] == 4 and counts["val_docs"] == 0
    assert counts["train_chars"] == sum(len(doc) for doc in all_docs(tmp_path / "run"))
    assert counts["val_chars"] == 0 and counts["decode_errors"] == 0


def test_min_chars(tmp_path):
    path = write(tmp_path / "docs.txt", "一二三四五\n一二三四五六七八九十\n一二三四五六七八九十十一\n")
    manifest = prepare(tmp_path / "run", path, min_chars=10, val_fraction=0.0)
    assert all_docs(tmp_path / "run") == ["一二三四五六七八九十", "一二三四五六七八九十十一"]
    assert manifest["counts"]["dropped_short"] == 1


def test_invalid_utf8_names_file_and_line_unless_skipped_or_replaced(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("第一篇正常的文档内容。\n第二篇也正常的文档。\n".encode() + b"caf\xe9 au lait, tres bien\n"
                     + "第四篇正常的文档内容。\n".encode())
    with pytest.raises(BadInput, match=rf"{path}:3: invalid UTF-8 at byte 3"):
        prepare(tmp_path / "run", path)
    assert sorted(p.name for p in (tmp_path / "run" / "corpus").iterdir()) == []  # no partial output left
    skipped = prepare(tmp_path / "run", path, on_decode_error="skip", val_fraction=0.0)
    assert skipped["counts"]["decode_errors"] == 1 and skipped["counts"]["train_docs"] == 3
    replaced = prepare(tmp_path / "run", path, on_decode_error="replace", val_fraction=0.0)
    assert replaced["counts"]["decode_errors"] == 1 and "caf\ufffd au lait, tres bien" in all_docs(tmp_path / "run")


@pytest.mark.parametrize(
    ("name", "data", "settings", "message"),
    [
        ("empty.txt", b"", {}, "no document left after cleaning"),
        ("short.txt", "短\n也短\n\n".encode(), {}, r"no document left after cleaning \(3 read, 3 shorter"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", {}, "looks binary"),
        ("bad.gz", b"not gzip at all", {}, "cannot read"),
        ("docs.jsonl", '{"text": "第一篇文档内容足够长。"}\n{"body": "x"}\n'.encode(), {}, r":2: no field 'text'"),
        ("docs.jsonl", b'{"text": \n', {}, ":1: not valid JSON"),
        ("docs.csv", "id,text\n1,第一篇文档内容足够长。\n".encode(), {"text_column": "body"},
         "unknown --text-column 'body'; the header has: id, text"),
        ("docs.csv", "1,第一篇文档内容足够长。\n".encode(), {"text_column": "5"}, "--text-column 5 is out of range"),
    ],
)
def test_bad_corpus_is_bad_input(tmp_path, name, data, settings, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(BadInput, match=message):
        prepare(tmp_path / "run", path, **settings)


def test_missing_corpus_path(tmp_path):
    with pytest.raises(BadInput, match="no such file or directory"):
        prepare(tmp_path / "run", tmp_path / "nope.txt")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(BadInput, match="holds no .txt/.jsonl/.csv/.tsv"):
        prepare(tmp_path / "run", tmp_path / "empty-dir")


# --- the validation split ----------------------------------------------------------------------------------


def test_val_split_is_a_pure_function_of_the_text_hash(tmp_path):
    docs = distinct_docs(400)
    path = write(tmp_path / "docs.txt", "".join(f"{doc}\n" for doc in docs))
    manifest = prepare(tmp_path / "run", path, val_fraction=0.1)
    train, val = split_docs(tmp_path / "run")
    assert set(val) == {doc for doc in docs if is_val(doc_hash(doc), 0.1)}
    assert 20 <= len(val) <= 60 and sorted(train + val) == sorted(docs)
    assert manifest["counts"]["val_docs"] == len(val) and manifest["counts"]["train_docs"] == len(train)
    assert manifest["counts"]["val_chars"] == sum(map(len, val))
    # Same text in another order and another run dir: the same split, byte for byte.
    shuffled = write(tmp_path / "shuffled.txt", "".join(f"{doc}\n" for doc in reversed(docs)))
    prepare(tmp_path / "run2", shuffled, val_fraction=0.1)
    assert (tmp_path / "run2" / "corpus" / "val.txt").read_bytes() == (tmp_path / "run" / "corpus" / "val.txt").read_bytes()
    assert sorted(split_docs(tmp_path / "run2")[0]) == sorted(train)


def test_split_is_stable_when_the_corpus_grows(tmp_path):
    old = write(tmp_path / "old.txt", "".join(f"{doc}\n" for doc in distinct_docs(300)))
    new = write(tmp_path / "new.txt", "".join(f"{doc}\n" for doc in distinct_docs(300, start=300)))
    prepare(tmp_path / "small", old, val_fraction=0.1)
    prepare(tmp_path / "grown", old, new, val_fraction=0.1)
    small_train, small_val = split_docs(tmp_path / "small")
    grown_train, grown_val = split_docs(tmp_path / "grown")
    assert set(small_train) <= set(grown_train) and set(small_val) <= set(grown_val)


def test_capped_val_split_never_moves_train_documents_to_val(tmp_path):
    old_docs, new_docs = distinct_docs(300), distinct_docs(300, start=300)
    old = write(tmp_path / "old.txt", "".join(f"{doc}\n" for doc in old_docs))
    new = write(tmp_path / "new.txt", "".join(f"{doc}\n" for doc in new_docs))
    prepare(tmp_path / "small", old, val_fraction=0.2, max_val_docs=10)
    prepare(tmp_path / "grown", old, new, val_fraction=0.2, max_val_docs=10)
    small_train, small_val = split_docs(tmp_path / "small")
    grown_train, grown_val = split_docs(tmp_path / "grown")
    assert len(small_val) == len(grown_val) == 10
    # The cap keeps the documents with the smallest hashes among those under the val fraction.
    under = sorted((doc for doc in old_docs + new_docs if is_val(doc_hash(doc), 0.2)), key=doc_hash)
    assert set(grown_val) == set(under[:10])
    assert set(small_train) <= set(grown_train), "a train document moved to val: it would leak into evaluation"
    assert set(grown_val) & set(old_docs) <= set(small_val)
    assert set(small_val) - set(grown_val), "the grown corpus should push some old val documents to train"
    assert sorted(grown_train + grown_val) == sorted(old_docs + new_docs)


def test_a_small_corpus_still_gets_one_val_document(tmp_path):
    docs = distinct_docs(5)
    path = write(tmp_path / "docs.txt", "".join(f"{doc}\n" for doc in docs))
    manifest = prepare(tmp_path / "run", path, val_fraction=0.001)
    train, val = split_docs(tmp_path / "run")
    assert val == [min(docs, key=doc_hash)] and len(train) == 4
    assert manifest["counts"]["val_docs"] == 1
    assert prepare(tmp_path / "none", path, val_fraction=0.0)["counts"]["val_docs"] == 0


# --- idempotent reruns and the output dir ------------------------------------------------------------------


def test_rerun_does_nothing_and_a_changed_input_is_redone(tmp_path):
    path = write(tmp_path / "docs.txt", "".join(f"{doc}\n" for doc in distinct_docs(50)))
    run_dir = tmp_path / "run"
    first = prepare(run_dir, path, val_fraction=0.1)
    before = aged_mtimes(run_dir)
    assert prepare(run_dir, path, val_fraction=0.1) == first
    assert mtimes(run_dir) == before

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))  # touched, same content
    assert prepare(run_dir, path, val_fraction=0.1)["counts"] == first["counts"]
    assert mtimes(run_dir) == before

    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("第7篇", "第X篇"), encoding="utf-8")  # same size, new content
    changed = prepare(run_dir, path, val_fraction=0.1)
    assert changed["fingerprint"] != first["fingerprint"]
    assert "第X篇文档：记者从北京报道，今天天气晴朗。" in all_docs(run_dir)

    with open(path, "a", encoding="utf-8") as handle:
        handle.write("新增的一篇文档，语料变大了。\n")
    grown = prepare(run_dir, path, val_fraction=0.1)
    assert grown["counts"]["read_docs"] == 51
    assert "新增的一篇文档，语料变大了。" in all_docs(run_dir)

    (run_dir / "corpus" / "val.txt").unlink()  # a deleted output is redone
    assert prepare(run_dir, path, val_fraction=0.1) == grown
    assert (run_dir / "corpus" / "val.txt").is_file()

    resettled = prepare(run_dir, path, val_fraction=0.1, min_chars=20)  # a changed setting is redone too
    assert resettled["settings"]["min_chars"] == 20 and resettled["counts"]["dropped_short"] == 1


def test_output_dir_with_user_files_is_refused_unless_overwrite(tmp_path):
    path = write(tmp_path / "docs.txt", "".join(f"{doc}\n" for doc in distinct_docs(10)))
    run_dir = tmp_path / "mine"
    write(run_dir / "notes.txt", "my notes")
    with pytest.raises(BadInput, match="not empty and holds no cpt run"):
        prepare(run_dir, path)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    prepare(run_dir, path, overwrite=True)
    assert (run_dir / "notes.txt").read_text() == "my notes"
    assert (run_dir / "corpus" / "train.txt").is_file()
    prepare(run_dir, path)  # now a cpt run dir: no --overwrite needed


# --- the real CLI: exit codes and one-line errors ----------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cpt_command(), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "no such file or directory"),
        ("empty", "no document left after cleaning"),
        ("cleaned-away", "no document left after cleaning"),
        ("binary", "looks binary"),
        ("unknown-column", "unknown --text-column 'body'"),
    ],
)
def test_cli_bad_input_exits_3_with_one_line(tmp_path, case, fragment):
    corpus = {
        "missing": tmp_path / "missing.txt",
        "empty": write(tmp_path / "empty.txt", ""),
        "cleaned-away": write(tmp_path / "noise.txt", "\u200b\u200b\n \x07 \n短\n"),
        "binary": tmp_path / "model.txt",
        "unknown-column": write(tmp_path / "docs.csv", "id,text\n1,第一篇文档内容足够长。\n"),
    }[case]
    if case == "binary":
        corpus.write_bytes(bytes(range(256)) * 4)
    extra = ["--text-column", "body"] if case == "unknown-column" else []
    result = run_cli("prepare", "--corpus", str(corpus), "--output", str(tmp_path / "run"), *extra)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpt: error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prepare_then_usage_error(tmp_path):
    corpus = SAMPLE_CORPUS
    ok = run_cli("prepare", "--corpus", str(corpus), "--output", str(tmp_path / "run"), "--val-fraction", "0.05")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["train_docs"] + manifest["counts"]["val_docs"] > 200
    assert manifest["settings"]["val_fraction"] == 0.05
    bad_flag = run_cli("prepare", "--corpus", str(corpus), "--output", str(tmp_path / "run"), "--no-such-flag")
    assert bad_flag.returncode == 2
    assert "Traceback" not in bad_flag.stderr
