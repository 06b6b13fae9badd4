"""Stage 2, `cpt tokenize --output RUN_DIR --base-model DIR`: documents -> sequences with word-start flags.

Whole-word boundaries are computed once here: jieba segments each document, and each token gets a
flag "starts a word" through the fast tokenizer's offset mapping (a word of several tokens has one
start; `##` pieces never start a word). Training masks whole words from these flags, so it never
re-tokenizes (the UER-py bug that lost [UNK]s and spaces).

Cutting and filling: a document of up to max-seq-length - 2 tokens is one sequence
`[CLS] doc [SEP]`. A longer one is cut into consecutive pieces of at most that many tokens,
each cut placed before a word start (a word is split only when one word fills more than half a
sequence); every piece is a sequence of its own. Short documents are not padded on disk; batches
pad or unpad them later. `--pack-documents` instead fills each sequence with consecutive pieces
`[CLS] a [SEP] b [SEP] ...` (attention then spans documents, as in original BERT pretraining).

The input is split into chunks of whole lines (1/32 of the file, between 64 KB and 4 MB: a property of the input, not of the
worker count), so the output is identical for any --workers and a killed run resumes per chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cpt.common.base_model import (
    BaseTokenizer,
    check_fits_positions,
    load_tokenizer,
    load_tokenizer_dir,
    tokenizer_fingerprint,
)
from cpt.common.files import (
    claim_run_dir,
    guard_trained_outputs,
    read_json,
    require_manifest,
    sha256_json,
    write_bytes_atomic,
    write_json_atomic,
)
from cpt.common.runtime import info, is_main_process, warn
from cpt.config import TokenizeConfig, default_workers
from cpt.data import vocab as vocab_extension
from cpt.data.segment import load_segmenter, token_word_starts, word_start_offsets
from cpt.data.shards import SHARD_FORMAT, chunk_is_complete, chunk_name, id_dtype, write_chunk
from cpt.errors import BadInput

CHUNK_BYTES = 4 << 20  # the largest chunk; smaller inputs get smaller chunks so every worker has work
MIN_CHUNK_BYTES = 64 << 10
CHUNKS_PER_FILE = 32
UNK_WARN_SHARE = 0.01


def cut_points(word_starts: np.ndarray, body_tokens: int) -> list[int]:
    """Start indices of the pieces a document of len(word_starts) tokens is cut into."""
    total = len(word_starts)
    points = [0]
    while total - points[-1] > body_tokens:
        start = points[-1]
        window = word_starts[start + body_tokens // 2 + 1 : start + body_tokens + 1]
        candidates = np.flatnonzero(window)
        cut = start + body_tokens // 2 + 1 + int(candidates[-1]) if len(candidates) else start + body_tokens
        points.append(cut)
    return points


def build_sequences(
    documents: list[tuple[np.ndarray, np.ndarray]], max_seq_length: int, pack: bool, cls_id: int, sep_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of each (ids, starts) document -> concatenated sequences: ids, starts, offsets (S + 1,)."""
    body_tokens = max_seq_length - 2
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, starts in documents:
        if not len(ids):
            continue
        points = cut_points(starts, body_tokens) + [len(ids)]
        pieces.extend((ids[a:b], starts[a:b]) for a, b in zip(points[:-1], points[1:], strict=True))
    groups: list[list[tuple[np.ndarray, np.ndarray]]] = []
    if pack:
        used = max_seq_length  # forces a new group for the first piece
        for piece in pieces:
            if used + len(piece[0]) + 1 > max_seq_length:
                groups.append([])
                used = 1
            groups[-1].append(piece)
            used += len(piece[0]) + 1
    else:
        groups = [[piece] for piece in pieces]
    id_parts: list[np.ndarray] = []
    start_parts: list[np.ndarray] = []
    lengths = []
    for group in groups:
        id_parts.append(np.array([cls_id]))
        start_parts.append(np.zeros(1, dtype=bool))
        for ids, starts in group:
            id_parts.extend((ids, np.array([sep_id])))
            start_parts.extend((starts, np.zeros(1, dtype=bool)))
        lengths.append(1 + sum(len(ids) + 1 for ids, _ in group))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    if not id_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), offsets
    return np.concatenate(id_parts), np.concatenate(start_parts), offsets


# --- worker side: one tokenizer and segmenter per process -------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, segmenter: str, jieba_dict: str | None, base_tokenizer_dir: str | None = None) -> None:
    """tokenizer_dir: the tokenizer to use (the base model's, or RUN_DIR/tokenizer/ when the vocab is extended);
    base_tokenizer_dir: with an extension, the base's, to count [UNK]s as they were without it."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer_dir(Path(tokenizer_dir))
    base = load_tokenizer_dir(Path(base_tokenizer_dir)) if base_tokenizer_dir else None
    _WORKER.update(tokenizer=tokenizer, base_tokenizer=base,
                   segment=load_segmenter(segmenter, Path(jieba_dict) if jieba_dict else None))


LONG_DOC_CHARS = 1 << 16  # longer documents are tokenized in windows: memory stays bounded
BATCH_CHARS = 1 << 18  # characters handed to the tokenizer at once: its encodings take ~160 bytes per char
_CUT_AFTER = "。！？；!?;…\n "  # window ends: every BERT pre-tokenizer and jieba split here anyway


def text_windows(text: str, max_chars: int = LONG_DOC_CHARS) -> list[tuple[int, int]]:
    """(start, end) spans covering `text`, each at most max_chars, cut after punctuation or a space where
    possible (there tokens and words are the same as in the whole text). A short text is one span."""
    spans, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(mark, start + max_chars // 2, end) for mark in _CUT_AFTER)
        end = cut + 1 if cut >= 0 else end
        spans.append((start, end))
        start = end
    spans.append((start, len(text)))
    return spans


def tokenize_documents(texts: list[str], tokenizer, segment) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids (N,) int64, word-start flags (N,) bool) per document, no special tokens."""
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in texts]
    pending: list[tuple[int, str]] = []  # (document index, text window)

    def flush() -> None:
        encodings = tokenizer.encode_batch([piece for _i, piece in pending])
        for (index, piece), encoding in zip(pending, encodings, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            char_starts = np.fromiter((start for start, _end in encoding.offsets), dtype=np.int64, count=len(ids))
            continuation = np.fromiter((token.startswith("##") for token in encoding.tokens), dtype=bool,
                                       count=len(ids))
            parts[index].append((ids, token_word_starts(char_starts, continuation, word_start_offsets(piece, segment))))
        pending.clear()

    pending_chars = 0
    for index, text in enumerate(texts):
        for start, end in text_windows(text):
            pending.append((index, text[start:end]))
            pending_chars += end - start
            if pending_chars >= BATCH_CHARS:
                flush()
                pending_chars = 0
    if pending:
        flush()
    return [(np.concatenate([ids for ids, _ in pieces]), np.concatenate([starts for _, starts in pieces]))
            for pieces in parts]


def _tokenize_chunk(task: tuple[str, int, int, str, int, bool, str]) -> dict:
    """Tokenize lines [byte_start, byte_end) of a split file into one chunk; returns its stats."""
    source, byte_start, byte_end, split_dir, index, pack, dtype_name = task
    tokenizer, segment = _WORKER["tokenizer"], _WORKER["segment"]
    with open(source, "rb") as handle:
        handle.seek(byte_start)
        texts = handle.read(byte_end - byte_start).decode("utf-8").splitlines()
    documents = tokenize_documents(texts, tokenizer, segment)
    ids, starts, offsets = build_sequences(
        documents, _WORKER["max_seq_length"], pack, tokenizer.cls_token_id, tokenizer.sep_token_id
    )
    name = chunk_name(index)
    write_chunk(Path(split_dir), name, ids, starts, offsets, np.dtype(dtype_name))
    body_tokens = sum(len(doc_ids) for doc_ids, _ in documents)
    stats = {
        "name": name,
        "chars": sum(len(text) for text in texts),
        "documents": len(texts),
        "sequences": len(offsets) - 1,
        "tokens": int(len(ids)),
        "body_tokens": int(body_tokens),
        "unk_tokens": int(sum(int((doc_ids == tokenizer.unk_token_id).sum()) for doc_ids, _ in documents)),
        "words": int(sum(int(doc_starts.sum()) for _, doc_starts in documents)),
    }
    if _WORKER.get("added_count"):
        stats.update(_extension_stats(texts, documents, stats, _WORKER["base_tokenizer"]))
    _write_stats(Path(split_dir) / f"{name}.stats.json", stats)
    return stats


def _extension_stats(texts: list[str], documents: list[tuple[np.ndarray, np.ndarray]], stats: dict, base) -> dict:
    """With an extended vocab: how often each added token occurs, and the [UNK]s the base vocab gives: counted
    by the base tokenizer when given, else (every added token was an [UNK] of its own) one per added token."""
    base_vocab_size = len(_WORKER["tokenizer"]) - _WORKER["added_count"]
    ids = np.concatenate([doc_ids for doc_ids, _ in documents]) if documents else np.zeros(0, dtype=np.int64)
    counts = np.bincount(ids[ids >= base_vocab_size] - base_vocab_size, minlength=_WORKER["added_count"])
    if base is None:
        return {"added_token_counts": counts.tolist(), "base_body_tokens": stats["body_tokens"],
                "base_unk_tokens": stats["unk_tokens"] + int(counts.sum())}
    base_ids = [encoding.ids for encoding in base.encode_batch(texts)]
    return {
        "added_token_counts": counts.tolist(),
        "base_body_tokens": int(sum(len(row) for row in base_ids)),
        "base_unk_tokens": int(sum(row.count(base.unk_token_id) for row in base_ids)),
    }


def _write_stats(path: Path, stats: dict) -> None:
    write_bytes_atomic(path, json.dumps(stats).encode())


def chunk_bytes_for(file_bytes: int) -> int:
    """Chunk size for one split file: a property of the input (never of the worker count), small enough
    that a small corpus still spreads over the workers, large enough to keep files few on a big one."""
    return min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, file_bytes // CHUNKS_PER_FILE))


def chunk_ranges(path: Path, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of whole lines, each about chunk_bytes long."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = 0
        while start < size:
            handle.seek(min(start + chunk_bytes, size))
            handle.readline()
            end = min(handle.tell(), size)
            yield start, end
            start = end


def tokenize_corpus(config: TokenizeConfig, *, tokenizer_dir: Path | None = None) -> dict:
    """Run the stage (or do nothing when its outputs are current). Returns the manifest. `tokenizer_dir`: a
    tokenizer to use instead of the base model's (no --extend-vocab then): the replay shards take the one the
    main shards were made with (cpt/data/replay.py)."""
    run_dir, corpus_manifest, base_tokenizer = _check_inputs(config)
    extension = vocab_extension.plan_extension(config, run_dir, corpus_manifest["fingerprint"], base_tokenizer)
    extended = bool(extension and extension["added_tokens"])
    tokenizer = extension["tokenizer"] if extended else base_tokenizer
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer_dir(tokenizer_dir)
    check_fits_positions(config.max_seq_length, config.base_model, what=f"--max-seq-length {config.max_seq_length}",
                         fix="pass --max-seq-length {positions} or less")
    request = _shards_request(config, corpus_manifest["fingerprint"], tokenizer)
    shards_dir = run_dir / "shards"
    previous = read_json(shards_dir / "manifest.json")
    if _shards_are_current(run_dir, previous, request, extended):
        info(f"tokenize: {shards_dir} is up to date ({previous['splits']['train']['sequences']} train sequences)")
        return previous
    _discard_stale_shards(run_dir, previous, request, overwrite=config.overwrite)
    if extended:
        tokenizer_dir = vocab_extension.write_tokenizer_dir(extension, config.base_model, run_dir)
    worker_args = _worker_args(config, tokenizer_dir or config.base_model, extension if extended else None)
    dtype = id_dtype(len(tokenizer))
    splits = _tokenize_train_and_val(run_dir, config, dtype, worker_args)
    manifest = _shards_manifest(config, request, len(tokenizer), dtype, splits, extension)
    write_json_atomic(shards_dir / "manifest.json", manifest)  # last: it marks every chunk as written
    _report(manifest, shards_dir, extension)
    return manifest


def _check_inputs(config: TokenizeConfig) -> tuple[Path, dict, BaseTokenizer]:
    """Claim the run dir and load what the stage reads: (run dir, the corpus manifest, the base tokenizer).
    The segmenter is loaded once here only to fail fast on a bad backend or dictionary."""
    claim_run_dir(config.output, overwrite=config.overwrite)
    run_dir = Path(config.output)
    corpus_manifest = require_manifest(run_dir / "corpus" / "manifest.json", "cpt prepare")
    base_tokenizer = load_tokenizer(config.base_model)
    load_segmenter(config.segmenter, config.jieba_dict)
    return run_dir, corpus_manifest, base_tokenizer


def _shards_request(config: TokenizeConfig, corpus_fingerprint: str, tokenizer: BaseTokenizer) -> dict:
    """Everything the shards' bytes depend on: shards made for another request are stale."""
    return {
        "corpus": corpus_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_length": config.max_seq_length,
        "pack_documents": config.pack_documents,
        "segmenter": _segmenter_identity(config),
        "chunking": [CHUNK_BYTES, MIN_CHUNK_BYTES, CHUNKS_PER_FILE],
        "shard_format": SHARD_FORMAT,
    }


def _shards_are_current(run_dir: Path, previous: dict | None, request: dict, extended: bool) -> bool:
    """The previous manifest was written for this request and every chunk it lists is on disk (with an
    extended vocab, RUN_DIR/tokenizer/ too): the stage has nothing to do."""
    return bool(previous and previous.get("request") == request and _chunks_present(run_dir / "shards", previous) and (
        not extended or _tokenizer_dir_matches(run_dir, request["tokenizer"])))


def _discard_stale_shards(run_dir: Path, previous: dict | None, request: dict, *, overwrite: bool) -> None:
    """Before (re)doing shards: checkpoints trained on other shards are refused (or moved aside with
    --overwrite), then chunks of an earlier request are removed and this request is recorded."""
    if previous and previous.get("request") != request:
        guard_trained_outputs(run_dir, overwrite=overwrite,
                              what_changed="the tokenizer settings, the prepared corpus or the shard format")
    _start_fresh_if_request_changed(run_dir / "shards", request)


def _worker_args(config: TokenizeConfig, tokenizer_dir: Path, extension: dict | None) -> tuple:
    """initargs of _init_worker_with_length. extension: the plan when the vocab is extended, else None; then the
    workers count the added tokens, and load the base tokenizer when [UNK]s under it need counting by it."""
    base_tokenizer_dir = str(config.base_model) if extension and vocab_extension.needs_base_count(extension) else None
    return (str(tokenizer_dir), config.segmenter, str(config.jieba_dict) if config.jieba_dict else None,
            config.max_seq_length, base_tokenizer_dir, len(extension["added_tokens"]) if extension else 0)


def _tokenize_train_and_val(run_dir: Path, config: TokenizeConfig, dtype: np.dtype, worker_args: tuple) -> dict:
    """Both splits through one pool of worker processes: {"train": summary, "val": summary}."""
    with ProcessPoolExecutor(max_workers=config.workers or default_workers(), initializer=_init_worker_with_length,
                             initargs=worker_args) as pool:
        return {split: _tokenize_split(pool, run_dir, split, config, dtype) for split in ("train", "val")}


def _shards_manifest(config: TokenizeConfig, request: dict, vocab_size: int, dtype: np.dtype, splits: dict,
                     extension: dict | None) -> dict:
    """shards/manifest.json: the request it answers, the settings, and each split's summary."""
    manifest = {
        "stage": "tokenize",
        "shard_format": SHARD_FORMAT,
        "request": request,
        "tokenizer_sha256": request["tokenizer"],
        "vocab_size": vocab_size,
        "id_dtype": dtype.name,
        "settings": {"max_seq_length": config.max_seq_length, "pack_documents": config.pack_documents,
                     "segmenter": request["segmenter"]},
        "splits": splits,
    }
    if extension:
        manifest["vocab_extension"] = vocab_extension.manifest_entry(extension, splits["train"])
    return manifest


def _report(manifest: dict, shards_dir: Path, extension: dict | None) -> None:
    """The stage's summary lines, and a warning when the vocab seems not to fit the text."""
    train = manifest["splits"]["train"]
    info(
        f"tokenize: {train['sequences']} train / {manifest['splits']['val']['sequences']} val sequences, "
        f"{train['tokens']} train tokens, [UNK] {train['unk_share']:.2%}, "
        f"{train['mean_word_tokens']:.2f} tokens/word -> {shards_dir}"
    )
    if extension:
        info(f"tokenize: [UNK] share of train tokens {vocab_extension.unk_text(vocab_extension.unk_summary(manifest))}")
    if train["unk_share"] > UNK_WARN_SHARE:
        warn(
            f"{train['unk_share']:.1%} of tokens are [UNK] (> 1%): the vocab may not fit this text "
            "(wrong base model, or traditional characters for a simplified vocab)"
        )


def _init_worker_with_length(tokenizer_dir: str, segmenter: str, jieba_dict: str | None, max_seq_length: int,
                             base_tokenizer_dir: str | None = None, added_count: int = 0) -> None:
    _init_worker(tokenizer_dir, segmenter, jieba_dict, base_tokenizer_dir)
    _WORKER.update(max_seq_length=max_seq_length, added_count=added_count)


def _tokenizer_dir_matches(run_dir: Path, fingerprint: str) -> bool:
    """RUN_DIR/tokenizer/ holds the extended tokenizer the shards were made with (not deleted or edited)."""
    try:
        return tokenizer_fingerprint(load_tokenizer_dir(run_dir / vocab_extension.TOKENIZER_DIR)) == fingerprint
    except BadInput:
        return False


def _segmenter_identity(config: TokenizeConfig) -> dict:
    backend = config.segmenter
    if backend == "auto":
        try:
            import rjieba  # noqa: F401

            backend = "rjieba"
        except ImportError:
            backend = "jieba"
    dictionary = None
    if config.jieba_dict:
        dictionary = hashlib.sha256(Path(config.jieba_dict).read_bytes()).hexdigest()
    return {"backend": backend, "user_dict_sha256": dictionary, "boundary_rules": 2}  # bump when flags change


def _chunks_present(shards_dir: Path, manifest: dict) -> bool:
    """Every chunk the manifest lists is still on disk (a deleted one is redone, the others kept)."""
    return all(
        chunk_is_complete(shards_dir / split, name)
        for split, summary in manifest.get("splits", {}).items()
        for name in summary.get("chunks", [])
    )


def _start_fresh_if_request_changed(shards_dir: Path, request: dict) -> None:
    """Chunks of an earlier, different request are cpt's own stale outputs: remove them."""
    request_path = shards_dir / "request.json"
    if (read_json(request_path) or {}) != request and shards_dir.exists():
        for split in ("train", "val"):
            shutil.rmtree(shards_dir / split, ignore_errors=True)
        (shards_dir / "manifest.json").unlink(missing_ok=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(request_path, request)


def _tokenize_split(pool: ProcessPoolExecutor, run_dir: Path, split: str, config: TokenizeConfig, dtype) -> dict:
    """One split: chunks finished by an earlier run are kept, the others are tokenized on the pool."""
    source = run_dir / "corpus" / f"{split}.txt"
    split_dir = run_dir / "shards" / split
    split_dir.mkdir(parents=True, exist_ok=True)
    tasks = _chunk_tasks(source, split_dir, config.pack_documents, dtype)
    stats, todo = _finished_chunks(split_dir, tasks)
    done_bytes = sum(end - start for _s, start, end, *_ in tasks) - sum(end - start for _s, start, end, *_ in todo)
    stats += _run_chunks(pool, todo, split, total_bytes=source.stat().st_size, done_bytes=done_bytes)
    stats.sort(key=lambda item: item["name"])
    return _summarize(stats)


def _chunk_tasks(source: Path, split_dir: Path, pack: bool, dtype) -> list[tuple[str, int, int, str, int, bool, str]]:
    """One _tokenize_chunk task per chunk of the split file: (source, byte start, byte end, split dir, chunk index,
    pack, id dtype name)."""
    ranges = list(chunk_ranges(source, chunk_bytes_for(source.stat().st_size)))
    return [
        (str(source), start, end, str(split_dir), index, pack, dtype.name)
        for index, (start, end) in enumerate(ranges)
    ]


def _finished_chunks(split_dir: Path, tasks: list[tuple]) -> tuple[list[dict], list[tuple]]:
    """(stats of the chunks already on disk with their stats, the tasks still to run): a killed run resumes here."""
    stats: list[dict] = []
    todo = []
    for task in tasks:
        name = chunk_name(task[4])
        stats_path = split_dir / f"{name}.stats.json"
        if chunk_is_complete(split_dir, name) and stats_path.is_file() and read_json(stats_path):
            stats.append(read_json(stats_path))
        else:
            todo.append(task)
    return stats, todo


def _run_chunks(pool: ProcessPoolExecutor, todo: list[tuple], split: str, *, total_bytes: int, done_bytes: int) -> list[dict]:
    """Tokenize the chunks of `todo` on the pool, in order: their stats. A progress bar over the split's bytes (and
    the rate in chars/s) shows on a terminal, on the main process."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(f"tokenize {split}"), BarColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
        transient=True, disable=not _show_progress(),
    )
    stats: list[dict] = []
    with progress:
        bar = progress.add_task(split, total=max(total_bytes, 1), rate="")
        progress.update(bar, completed=done_bytes)
        started = _now()
        chars = 0
        for task, result in zip(todo, pool.map(_tokenize_chunk, todo), strict=True):
            stats.append(result)
            chars += result["chars"]
            progress.update(bar, advance=task[2] - task[1],
                            rate=f"{chars / max(_now() - started, 1e-9) / 1000:.0f}k chars/s")
    return stats


def _now() -> float:
    import time

    return time.perf_counter()


def _show_progress() -> bool:
    import sys

    return sys.stderr.isatty() and is_main_process()


def _summarize(stats: list[dict]) -> dict:
    total = {key: sum(item[key] for item in stats)
             for key in ("chars", "documents", "sequences", "tokens", "body_tokens", "unk_tokens", "words")}
    summary = {
        "chunks": [item["name"] for item in stats],
        **total,
        "unk_share": total["unk_tokens"] / max(total["body_tokens"], 1),
        "mean_word_tokens": total["body_tokens"] / max(total["words"], 1),
        "fingerprint": sha256_json(stats),
    }
    if stats and "base_unk_tokens" in stats[0]:  # an extended vocab: the base vocab's numbers beside
        for key in ("base_body_tokens", "base_unk_tokens"):
            summary[key] = sum(item[key] for item in stats)
        summary["base_unk_share"] = summary["base_unk_tokens"] / max(summary["base_body_tokens"], 1)
        summary["added_token_counts"] = np.sum([item["added_token_counts"] for item in stats], axis=0).tolist()
    return summary
