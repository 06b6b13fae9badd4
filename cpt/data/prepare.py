"""Stage 1, `cpt prepare --corpus PATH... --output RUN_DIR`: raw files -> clean, deduplicated documents.

Writes RUN_DIR/corpus/train.txt and val.txt (one document a line) and manifest.json (inputs with
sizes and hashes, settings, counts). Streams: memory holds one document, the duplicate hashes
(8 bytes a document) and at most --max-val-docs validation documents.

The validation split is a pure function of each document's text hash: a document goes to val
when its hash falls under --val-fraction. When --max-val-docs caps the split, the documents with
the smallest hashes stay; so a rerun keeps every document on its side, and a grown corpus can
only move old val documents to train, never train documents to val (no leak into evaluation).
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import heapq
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from cpt.common.files import atomic_file, claim_run_dir, guard_trained_outputs, read_json, sha256_json, write_json_atomic
from cpt.common.runtime import info
from cpt.config import PrepareConfig
from cpt.errors import BadInput

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
HASH_SPACE = 1 << 64
TEXT_COLUMN_GUESSES = ("text", "content", "sentence", "review", "document", "body")

csv.field_size_limit(sys.maxsize)


def _build_delete_table() -> dict[int, None]:
    """Control (Cc) and format (Cf, e.g. zero-width) characters, except whitespace controls."""
    table = {}
    for code_point in range(0x30000):
        char = chr(code_point)
        if unicodedata.category(char) in ("Cc", "Cf") and not char.isspace():
            table[code_point] = None
    return table


_DELETE = _build_delete_table()
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Remove control and zero-width characters, collapse whitespace runs to one space, strip."""
    return _WHITESPACE.sub(" ", text.translate(_DELETE)).strip()


def doc_hash(text: str) -> int:
    """64-bit hash of a cleaned document: identity for dedup and the val split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_val(hash_value: int, val_fraction: float) -> bool:
    return hash_value < val_fraction * HASH_SPACE


def format_of(path: Path) -> str:
    """'.txt', '.jsonl', '.csv' or '.tsv' from the name (a trailing .gz is ignored); unknown -> '.txt'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    return {".json": ".jsonl", ".ndjson": ".jsonl"}.get(suffix, suffix if suffix in TEXT_SUFFIXES else ".txt")


def _is_text_candidate(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return not path.name.startswith(".") and any(name.endswith(s) for s in TEXT_SUFFIXES + (".json", ".ndjson"))


def resolve_corpus_paths(patterns: tuple[str, ...], run_dir: Path | None = None) -> list[Path]:
    """Files named by each PATH: a file, a directory (recursive, sorted, text suffixes only) or a glob.

    Files inside `run_dir` are cpt's own outputs (a run dir placed inside the corpus dir), never input.
    """
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if any(char in pattern for char in "*?["):
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True))
            matches = [match for match in matches if match.is_file()]
            if not matches:
                raise BadInput(f"--corpus {pattern}: the glob matches no file; check the pattern")
            files.extend(matches)
        elif path.is_dir():
            found = sorted(
                Path(root) / name
                for root, _dirs, names in os.walk(path, followlinks=False)
                for name in names
                if _is_text_candidate(Path(name)) and (Path(root) / name).is_file()
            )
            if not found:
                raise BadInput(f"--corpus {path}: the directory holds no .txt/.jsonl/.csv/.tsv(.gz) file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists() or path.is_symlink():
            raise BadInput(f"--corpus {path}: not a regular file or directory (a broken or looping link?)")
        else:
            raise BadInput(f"--corpus {path}: no such file or directory; check the path (or CPT_CORPUS)")
    unique = list(dict.fromkeys(files))
    if run_dir is not None:
        run_dir = Path(run_dir).resolve()
        unique = [path for path in unique if not path.resolve().is_relative_to(run_dir)]
        if not unique:
            raise BadInput(f"--corpus: every file it names is inside the run dir --output {run_dir}; pass your text files")
    for path in unique:
        if not os.access(path, os.R_OK):
            raise BadInput(f"--corpus {path}: not readable; fix its permissions")
    return unique


def _open_binary(path: Path):
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rb")


def _check_not_binary(path: Path) -> None:
    try:
        with _open_binary(path) as handle:
            head = handle.read(8192)
    except (OSError, EOFError) as error:
        raise BadInput(f"{path}: cannot read ({error}); is it a valid (gzip) text file?") from None
    if b"\0" in head:
        raise BadInput(f"{path}: looks binary (NUL bytes), not UTF-8 text; pass text files only")


def decoded_lines(path: Path, on_decode_error: str, counts: Counter) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file, UTF-8 with BOM stripped, invalid bytes handled per policy."""
    with _open_binary(path) as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    if on_decode_error == "error":
                        raise BadInput(
                            f"{path}:{number}: invalid UTF-8 at byte {error.start}; convert the file to UTF-8 "
                            "or pass --on-decode-error skip|replace"
                        ) from None
                    counts["decode_errors"] += 1
                    if on_decode_error == "skip":
                        continue
                    line = raw.decode("utf-8", errors="replace")
                if number == 1:
                    line = line.removeprefix("\ufeff")
                yield number, line
        except (OSError, EOFError) as error:
            raise BadInput(f"{path}: read failed ({error}); is the (gzip) file truncated?") from None


def _txt_documents(path: Path, config: PrepareConfig, counts: Counter) -> Iterator[str]:
    if config.doc_separator == "line":
        for _number, line in decoded_lines(path, config.on_decode_error, counts):
            yield line
        return
    paragraph: list[str] = []
    for _number, line in decoded_lines(path, config.on_decode_error, counts):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []
    if paragraph:
        yield " ".join(paragraph)


def _jsonl_documents(path: Path, config: PrepareConfig, counts: Counter) -> Iterator[str]:
    for number, line in decoded_lines(path, config.on_decode_error, counts):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise BadInput(f"{path}:{number}: not valid JSON; each line of a .jsonl file must be one object") from None
        if not isinstance(record, dict) or config.text_field not in record:
            raise BadInput(f"{path}:{number}: no field {config.text_field!r}; pass --text-field NAME")
        value = record[config.text_field]
        if isinstance(value, str):
            yield value
        else:
            counts["dropped_not_text"] += 1


def _looks_like_header(row: list[str]) -> bool:
    return bool(row) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ .-]{0,63}", cell.strip() or "-") for cell in row)


def choose_text_column(first_row: list[str], text_column: str, path: Path) -> tuple[int, bool]:
    """(column index, first row is a header) for a .csv/.tsv file."""
    has_header = _looks_like_header(first_row)
    if text_column.isdigit():
        index = int(text_column)
        if index >= len(first_row):
            raise BadInput(f"{path}: --text-column {index} is out of range; the file has {len(first_row)} columns")
        return index, has_header
    if text_column:
        names = [cell.strip() for cell in first_row]
        if text_column not in names:
            raise BadInput(f"{path}: unknown --text-column {text_column!r}; the header has: {', '.join(names)}")
        return names.index(text_column), True
    if has_header:
        names = [cell.strip().lower() for cell in first_row]
        for guess in TEXT_COLUMN_GUESSES:
            if guess in names:
                return names.index(guess), True
    return len(first_row) - 1, has_header


def _table_documents(path: Path, config: PrepareConfig, counts: Counter, delimiter: str) -> Iterator[str]:
    lines = (line for _number, line in decoded_lines(path, config.on_decode_error, counts))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    try:
        first = next(reader, None)
        if first is None:
            return
        column, has_header = choose_text_column(first, config.text_column, path)
        rows = reader if has_header else _prepend(first, reader)
        for row in rows:
            if column < len(row):
                yield row[column]
            else:
                counts["dropped_short_row"] += 1
    except csv.Error as error:
        raise BadInput(f"{path}:{reader.line_num}: malformed {delimiter!r}-separated row ({error})") from None


def _prepend(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def raw_documents(path: Path, config: PrepareConfig, counts: Counter) -> Iterator[str]:
    _check_not_binary(path)
    kind = format_of(path)
    if kind == ".jsonl":
        return _jsonl_documents(path, config, counts)
    if kind in (".csv", ".tsv"):
        return _table_documents(path, config, counts, "," if kind == ".csv" else "\t")
    return _txt_documents(path, config, counts)


def input_record(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def settings_record(config: PrepareConfig) -> dict[str, object]:
    return {
        "doc_separator": config.doc_separator,
        "text_field": config.text_field,
        "text_column": config.text_column,
        "on_decode_error": config.on_decode_error,
        "min_chars": config.min_chars,
        "val_fraction": config.val_fraction,
        "max_val_docs": config.max_val_docs,
    }


def _inputs_unchanged(previous: dict, inputs: list[dict[str, object]]) -> bool:
    """Same files, sizes and mtimes as recorded, or same content hashes where an mtime moved."""
    old = previous.get("inputs", [])
    if [(r["path"], r["bytes"]) for r in old] != [(r["path"], r["bytes"]) for r in inputs]:
        return False
    for old_record, new_record in zip(old, inputs, strict=True):
        if old_record["mtime_ns"] != new_record["mtime_ns"]:
            if _sha256_of_path(Path(str(new_record["path"]))) != old_record.get("sha256"):
                return False
    return True


def _sha256_of_path(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_corpus(config: PrepareConfig) -> dict:
    """Run the stage (or do nothing when its outputs are current). Returns the manifest."""
    paths = resolve_corpus_paths(config.corpus, run_dir=config.output)
    claim_run_dir(config.output, overwrite=config.overwrite)
    corpus_dir = Path(config.output) / "corpus"
    manifest_path = corpus_dir / "manifest.json"
    inputs = [input_record(path) for path in paths]
    previous = read_json(manifest_path)
    current = (
        bool(previous)
        and previous.get("settings") == settings_record(config)
        and all((corpus_dir / name).is_file() for name in ("train.txt", "val.txt"))  # a deleted output is redone
        and _inputs_unchanged(previous, inputs)
    )
    if current:
        info(f"prepare: {corpus_dir} is up to date ({previous['counts']['train_docs']} train documents)")
        return previous
    if previous and (previous.get("settings") != settings_record(config) or not _inputs_unchanged(previous, inputs)):
        guard_trained_outputs(config.output, overwrite=config.overwrite, what_changed="the corpus or prepare settings")
    corpus_dir.mkdir(parents=True, exist_ok=True)
    # The two splits are renamed into place one after the other: without the old manifest, a kill between
    # the renames cannot leave a new train.txt beside an old val.txt that passes for current.
    manifest_path.unlink(missing_ok=True)
    manifest = _write_split(paths, inputs, config, corpus_dir)
    write_json_atomic(manifest_path, manifest)
    counts = manifest["counts"]
    info(
        f"prepare: {counts['train_docs']} train / {counts['val_docs']} val documents, "
        f"{counts['train_chars'] + counts['val_chars']} characters -> {corpus_dir}"
    )
    return manifest


def unique_documents(paths: list[Path], config: PrepareConfig, counts: Counter) -> Iterator[tuple[int, str]]:
    """(hash, text) of each cleaned document of at least --min-chars characters, first occurrences only.
    Counts read, dropped (empty or short) and duplicate documents in `counts`."""
    seen_hashes: set[int] = set()
    for path in paths:
        for raw in raw_documents(path, config, counts):
            counts["read_docs"] += 1
            text = clean_text(raw)
            if len(text) < config.min_chars:
                counts["dropped_empty" if not text else "dropped_short"] += 1
                continue
            hash_value = doc_hash(text)
            if hash_value in seen_hashes:
                counts["duplicates"] += 1
                continue
            seen_hashes.add(hash_value)
            yield hash_value, text


def _write_split(paths: list[Path], inputs: list[dict], config: PrepareConfig, corpus_dir: Path) -> dict:
    counts: Counter = Counter()
    val_heap: list[tuple[int, str]] = []  # max-heap by hash via negation: the smallest hashes stay
    lowest_train: tuple[int, str] | None = None
    # Both files are written to temp names and shown only once both are complete (val, then train); bad
    # input found mid-file, or an interrupt, leaves no partial file behind.
    with atomic_file(corpus_dir / "train.txt", "w") as train_file:
        for hash_value, text in unique_documents(paths, config, counts):
            if is_val(hash_value, config.val_fraction) and config.max_val_docs > 0:
                heapq.heappush(val_heap, (-hash_value, text))
                if len(val_heap) <= config.max_val_docs:
                    continue
                hash_value, text = heapq.heappop(val_heap)
                hash_value = -hash_value
            if lowest_train is None or hash_value < lowest_train[0]:
                if lowest_train is not None:
                    _write_doc(train_file, lowest_train[1], counts, "train")
                lowest_train = (hash_value, text)
            else:
                _write_doc(train_file, text, counts, "train")
        for path, record in zip(paths, inputs, strict=True):
            record["sha256"] = _sha256_of_path(path)
        # Keep one val document for any corpus of two or more, so training can always evaluate.
        if lowest_train is not None:
            if not val_heap and config.val_fraction > 0 and config.max_val_docs > 0 and counts["train_docs"] > 0:
                val_heap.append((-lowest_train[0], lowest_train[1]))
            else:
                _write_doc(train_file, lowest_train[1], counts, "train")
        if counts["train_docs"] == 0:
            raise BadInput(
                f"--corpus: no document left after cleaning ({counts['read_docs']} read, "
                f"{counts['dropped_short'] + counts['dropped_empty']} shorter than --min-chars {config.min_chars}, "
                f"{counts['duplicates']} duplicates); pass more text or lower --min-chars"
            )
        with atomic_file(corpus_dir / "val.txt", "w") as val_file:
            for _negated, text in sorted(val_heap, reverse=True):
                _write_doc(val_file, text, counts, "val")
    summary = {key: counts.get(key, 0) for key in (
        "read_docs", "dropped_short", "dropped_empty", "dropped_not_text", "dropped_short_row", "decode_errors",
        "duplicates", "train_docs", "val_docs", "train_chars", "val_chars")}
    manifest = {"stage": "prepare", "inputs": inputs, "settings": settings_record(config), "counts": summary}
    manifest["fingerprint"] = sha256_json({"inputs": [r["sha256"] for r in inputs], "settings": manifest["settings"]})
    return manifest


def _write_doc(handle, text: str, counts: Counter, split: str) -> None:
    handle.write(text + "\n")
    counts[f"{split}_docs"] += 1
    counts[f"{split}_chars"] += len(text)
