"""Vocabulary extension: tokens appended to the base vocab (the model is resized to match in training).

    cpt tokenize --output RUN_DIR --base-model DIR --extend-vocab auto    # or FILE, or off (the default)

The Chinese BERT vocab (21128 tokens) has no curly quotes, ellipsis or dashes (“ ” ‘ ’ … — –), nor
rarer characters of most domains: every one of them becomes [UNK]. `--extend-vocab auto` adds the
characters that are [UNK] in the base vocab, that the tokenizer always cuts out as a token of their own
(punctuation and Chinese characters), and that occur at least `--extend-vocab-min-count` times in the
train split: the `--extend-vocab-max` most frequent. `--extend-vocab FILE` adds the tokens of a file
(one per line; a token must be one piece for the tokenizer's pre-tokenizer: a character, a Latin word,
or a `##` continuation). New tokens are APPENDED: every existing id keeps its meaning.

Where things go:
- RUN_DIR/tokenizer/: vocab.txt (+ tokenizer.json when the base has one), tokenizer_config.json and
  special_tokens_map.json of the base, extension.json (what was added and why). `cpt tokenize` uses it.
- shards/manifest.json `vocab_extension`: the added tokens with their ids, their count in the train
  split and the pieces the base tokenizer made of them; the train split's [UNK] share with the base
  vocab (`unk_share_before`) and with the extended one (`unk_share_after`).
- `cpt train` loads the extended tokenizer (`training_tokenizer`) and resizes the model
  (`resize_for_extension` in cpt/training/model.py); `cpt export` writes the extended vocab and
  config.json's vocab_size.

How a new row starts (`init_new_rows` in cpt/training/model.py), the word embedding (= the tied decoder
row) and the output bias:
- a token the base tokenizer made into known pieces (e.g. "blockchain" -> block ##chain): the mean
  of the pieces' embeddings, and the mean of their biases;
- a token the base tokenizer made into [UNK] (every `auto` token): the [UNK] row itself, so at step 0
  the encoder sees exactly what it saw for this text before (hidden states unchanged); the bias is
  [UNK]'s plus log(share of the token among those new tokens in the train split, counts + 1), so the
  new tokens start by sharing the probability the model gave [UNK] there, in proportion to their
  frequency. Training then tells them apart (a mean of all embeddings would instead feed the encoder
  an input it never saw at the places where it used to see [UNK]).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

from cpt.common.base_model import BaseTokenizer, load_tokenizer, load_tokenizer_dir, tokenizer_fingerprint
from cpt.common.files import atomic_dir, read_json, write_json_atomic
from cpt.common.runtime import info
from cpt.errors import BadInput

TOKENIZER_DIR = "tokenizer"  # under RUN_DIR
RECORD_FILE = "extension.json"
COPIED_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_COUNT_BLOCK_CHARS = 1 << 24


# --- choosing the tokens ----------------------------------------------------------------------------

def count_characters(path: Path) -> Counter:
    """How often each character occurs in a text file (read in blocks: memory stays bounded)."""
    counts: Counter = Counter()
    with open(path, encoding="utf-8") as handle:
        while block := handle.read(_COUNT_BLOCK_CHARS):
            counts.update(block)
    return counts


def isolated_unk_characters(tokenizer: BaseTokenizer, counts: Counter) -> Counter:
    """Of `counts`, the characters the tokenizer makes into one [UNK] of their own wherever they occur
    (its pre-tokenizer cuts them out: punctuation, Chinese characters), keyed by their normalized form.
    A letter of an unknown script inside a word is left out: adding it would need `##` pieces too."""
    backend = tokenizer.backend_tokenizer
    characters = sorted(counts)
    found: Counter = Counter()
    for character, encoding in zip(characters, tokenizer.encode_batch(characters), strict=True):
        if encoding.ids != [tokenizer.unk_token_id]:
            continue
        normalized = _normalize(backend, character).strip()
        if len(normalized) == 1 and is_isolated(tokenizer, character):
            found[normalized] += counts[character]
    return found


def is_isolated(tokenizer: BaseTokenizer, text: str) -> bool:
    """The pre-tokenizer always cuts `text` out as a word of its own (punctuation, a Chinese character)."""
    backend = tokenizer.backend_tokenizer
    return _pre_tokens(backend, f"a{text}a") == ["a", _normalize(backend, text).strip(), "a"]


def needs_base_count(plan: dict) -> bool:
    """Whether tokenize must also run the base tokenizer to count [UNK]s without the extension. Not when every
    added token was an [UNK] of its own in the base vocab: then each occurrence replaced exactly one [UNK]."""
    return not all(token["isolated"] for token in plan["added_tokens"])


def auto_tokens(tokenizer: BaseTokenizer, train_path: Path, min_count: int, max_tokens: int) -> list[str]:
    """The most frequent isolated [UNK] characters of the train split, at least min_count times each."""
    candidates = isolated_unk_characters(tokenizer, count_characters(train_path))
    ranked = sorted((item for item in candidates.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
    return [token for token, _count in ranked[:max_tokens]]


def file_tokens(tokenizer: BaseTokenizer, path: Path) -> list[str]:
    """The tokens of FILE (one per line) that the base vocab lacks; each must be one piece for the tokenizer."""
    backend = tokenizer.backend_tokenizer
    vocab = tokenizer.get_vocab()
    tokens: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        token = line.strip()
        if not token or token in tokens:
            continue
        if token in vocab:
            info(f"--extend-vocab {path}:{number}: {token!r} is in the base vocab already; skipped")
            continue
        body = token[2:] if token.startswith("##") and len(token) > 2 else token
        pieces = _pre_tokens(backend, body)
        if len(pieces) != 1:
            raise BadInput(f"--extend-vocab {path}:{number}: the tokenizer cuts {body!r} into {pieces} before it "
                           "looks at the vocab (every Chinese character and punctuation mark is a word of its own); "
                           "list single characters, Latin words or ## pieces")
        if pieces[0] != body:
            raise BadInput(f"--extend-vocab {path}:{number}: the tokenizer normalizes {body!r} to {pieces[0]!r} "
                           f"(lower case, accents), so {token!r} would never match; write it as it normalizes")
        tokens.append(token)
    return tokens


def _normalize(backend, text: str) -> str:
    return backend.normalizer.normalize_str(text) if backend.normalizer is not None else text


def _pre_tokens(backend, text: str) -> list[str]:
    normalized = _normalize(backend, text)
    if backend.pre_tokenizer is None:
        return [normalized]
    return [piece for piece, _span in backend.pre_tokenizer.pre_tokenize_str(normalized)]


# --- the extended tokenizer ---------------------------------------------------------------------------

def extended_backend(tokenizer: BaseTokenizer, tokens: list[str]):
    """A copy of the base's WordPiece tokenizer with `tokens` appended to its vocab (ids from len(vocab) on)."""
    from tokenizers import Tokenizer

    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    model = definition["model"]
    if model.get("type") != "WordPiece":
        raise BadInput(f"--extend-vocab works with WordPiece (BERT) tokenizers; the base's is {model.get('type')}")
    vocab = model["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(tokenizer) != len(vocab):
        raise BadInput("--extend-vocab: the base tokenizer has added tokens beyond (or gaps in) its vocab; new tokens "
                       "could not be appended without moving ids")
    for offset, token in enumerate(tokens):
        vocab[token] = len(tokenizer) + offset
    return Tokenizer.from_str(json.dumps(definition, ensure_ascii=False))


def plan_extension(config, run_dir: Path, corpus_fingerprint: str, base: BaseTokenizer) -> dict | None:
    """What --extend-vocab adds (None for off): the tokens, cached in RUN_DIR/tokenizer/extension.json so a
    rerun does not count the corpus again, and the extended tokenizer (in memory; written by write_tokenizer_dir)."""
    if config.extend_vocab == "off":
        return None
    mode = "auto" if config.extend_vocab == "auto" else "file"
    source = {"mode": mode, "base_tokenizer_sha256": tokenizer_fingerprint(base)}
    if mode == "auto":
        source.update(corpus=corpus_fingerprint, min_count=config.extend_vocab_min_count,
                      max_tokens=config.extend_vocab_max)
    else:
        source["file_sha256"] = hashlib.sha256(Path(config.extend_vocab).read_bytes()).hexdigest()
    cached = read_json(Path(run_dir) / TOKENIZER_DIR / RECORD_FILE) or {}
    if cached.get("source") == source:
        tokens = [entry["token"] for entry in cached["added_tokens"]]
    elif mode == "auto":
        tokens = auto_tokens(base, Path(run_dir) / "corpus" / "train.txt", config.extend_vocab_min_count,
                             config.extend_vocab_max)
    else:
        tokens = file_tokens(base, Path(config.extend_vocab))
    if not tokens:
        info(f"tokenize: --extend-vocab {config.extend_vocab} finds no token to add; the base vocab is used")
        return {"source": source, "added_tokens": [], "tokenizer": base}
    backend = extended_backend(base, tokens)
    extended = BaseTokenizer(backend_tokenizer=backend, unk_token_id=base.unk_token_id, sep_token_id=base.sep_token_id,
                             pad_token_id=base.pad_token_id, cls_token_id=base.cls_token_id,
                             mask_token_id=base.mask_token_id, extra_special_ids=base.extra_special_ids)
    pieces = [encoding.ids for encoding in base.encode_batch(tokens)]
    added = [{"token": token, "id": len(base) + offset, "base_pieces": token_pieces,
              "isolated": token_pieces == [base.unk_token_id] and is_isolated(base, token)}
             for offset, (token, token_pieces) in enumerate(zip(tokens, pieces, strict=True))]
    return {"source": source, "added_tokens": added, "tokenizer": extended, "base_vocab_size": len(base),
            "vocab_size": len(base) + len(tokens), "unk_token_id": base.unk_token_id}


def write_tokenizer_dir(plan: dict, base_model: Path, run_dir: Path) -> Path:
    """RUN_DIR/tokenizer/: the base's tokenizer files with the new tokens appended; checked by reloading
    before it replaces the previous one (cpt.common.files.atomic_dir)."""
    base_model, target = Path(base_model), Path(run_dir) / TOKENIZER_DIR
    tokens = [entry["token"] for entry in plan["added_tokens"]]
    with atomic_dir(target, replace=True) as tmp:
        for name in COPIED_FILES:
            if (base_model / name).is_file():
                shutil.copy2(base_model / name, tmp / name)
        backend = plan["tokenizer"].backend_tokenizer
        new_lines = "".join(f"{token}\n" for token in tokens).encode()
        if (base_model / "vocab.txt").is_file():  # byte for byte, then the new lines: no base line can move
            base_bytes = (base_model / "vocab.txt").read_bytes()
            (tmp / "vocab.txt").write_bytes(base_bytes + (b"\n" if base_bytes and not base_bytes.endswith(b"\n") else b"")
                                            + new_lines)
        else:
            vocab = backend.get_vocab(with_added_tokens=False)
            (tmp / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)),
                                           encoding="utf-8")
        if (base_model / "tokenizer.json").is_file():
            definition = json.loads((base_model / "tokenizer.json").read_text(encoding="utf-8"))
            for offset, token in enumerate(tokens):
                definition["model"]["vocab"][token] = plan["base_vocab_size"] + offset
            (tmp / "tokenizer.json").write_text(json.dumps(definition, ensure_ascii=False, indent=2), encoding="utf-8")
        record = {key: value for key, value in plan.items() if key != "tokenizer"}
        write_json_atomic(tmp / RECORD_FILE, record)
        reloaded = load_tokenizer_dir(tmp)
        if tokenizer_fingerprint(reloaded) != tokenizer_fingerprint(plan["tokenizer"]):
            raise RuntimeError(f"{tmp}: the written tokenizer differs from the extended one it was written from")
    return target


def manifest_entry(plan: dict, train_stats: dict) -> dict:
    """shards/manifest.json's `vocab_extension`: added tokens with their train-split counts, [UNK] before/after."""
    counts = train_stats.get("added_token_counts") or [0] * len(plan["added_tokens"])
    entry = {key: value for key, value in plan.items() if key != "tokenizer"}
    entry["added_tokens"] = [{**token, "count": int(count)} for token, count in zip(plan["added_tokens"], counts,
                                                                                      strict=True)]
    if plan["added_tokens"]:
        entry["tokenizer_dir"] = TOKENIZER_DIR
    entry["unk_share_before"] = train_stats.get("base_unk_share", train_stats["unk_share"])
    entry["unk_share_after"] = train_stats["unk_share"]
    return entry


# --- what training and export read ----------------------------------------------------------------------

def added_tokens(shards_manifest: dict) -> list[dict]:
    return ((shards_manifest or {}).get("vocab_extension") or {}).get("added_tokens") or []


def training_tokenizer(run_dir: Path, base_model: Path, shards_manifest: dict) -> BaseTokenizer:
    """The tokenizer the shards were made with: the base's, or the extended one in RUN_DIR/tokenizer/ when the
    base is the one it was extended from (else the base's, so the caller's fingerprint check names the mismatch)."""
    base = load_tokenizer(base_model)
    extension = shards_manifest.get("vocab_extension") or {}
    if not added_tokens(shards_manifest) or tokenizer_fingerprint(base) != extension["source"]["base_tokenizer_sha256"]:
        return base
    return load_tokenizer_dir(extension_dir(run_dir, shards_manifest))


def extension_dir(run_dir: Path, shards_manifest: dict) -> Path:
    """RUN_DIR/tokenizer/ of an extended run, checked to be there."""
    path = Path(run_dir) / shards_manifest["vocab_extension"]["tokenizer_dir"]
    if not (path / "vocab.txt").is_file():
        raise BadInput(f"{path}: the extended tokenizer the shards were made with (--extend-vocab) is missing; "
                       "rerun `cpt tokenize` (or `cpt run`) with the same settings to write it again")
    return path


def export_overrides(run_dir: Path, shards_manifest: dict) -> tuple[list[Path], dict]:
    """What an export dir takes instead of the base's files: the extended vocab.txt / tokenizer.json, and the
    config.json settings to change (vocab_size). ([], {}) when the vocab was not extended."""
    if not added_tokens(shards_manifest):
        return [], {}
    source = extension_dir(run_dir, shards_manifest)
    files = [source / name for name in ("vocab.txt", "tokenizer.json") if (source / name).is_file()]
    return files, {"vocab_size": shards_manifest["vocab_extension"]["vocab_size"]}


# --- what plan and report show --------------------------------------------------------------------------

def unk_summary(shards_manifest: dict) -> dict:
    """The train split's [UNK] share, with the base vocab and with the extension, and the added tokens."""
    train = shards_manifest["splits"]["train"]
    extension = shards_manifest.get("vocab_extension") or {}
    return {"unk_share": train["unk_share"], "unk_share_base": extension.get("unk_share_before", train["unk_share"]),
            "added_tokens": [(token["token"], token["count"]) for token in extension.get("added_tokens") or []]}


def unk_text(summary: dict, shown: int = 12) -> str:
    """One line: '0.65% -> 0.01% with 7 added tokens: “ 1,738, ” 1,692, ...' or '0.65% (vocab not extended)'."""
    tokens = summary["added_tokens"]
    if not tokens:
        return f"{summary['unk_share']:.2%} (vocab not extended)"
    listed = ", ".join(f"{token} {count:,}" for token, count in tokens[:shown])
    more = f" and {len(tokens) - shown} more" if len(tokens) > shown else ""
    return (f"{summary['unk_share_base']:.2%} with the base vocab -> {summary['unk_share']:.2%} with "
            f"{len(tokens)} added tokens ({listed}{more})")


# --- is one tokenizer the other extended (`cpt eval` of a base and its extended export) --------------------

def extends(larger: BaseTokenizer, smaller: BaseTokenizer) -> bool:
    """`larger` is `smaller` with tokens appended (what --extend-vocab makes): same rules, same ids below len(smaller)."""
    from tokenizers import Tokenizer

    if len(larger) <= len(smaller):
        return False
    definition = json.loads(larger.backend_tokenizer.to_str())
    vocab = definition["model"].get("vocab")
    if not isinstance(vocab, dict):
        return False
    definition["model"]["vocab"] = {token: token_id for token, token_id in vocab.items() if token_id < len(smaller)}
    truncated = BaseTokenizer(backend_tokenizer=Tokenizer.from_str(json.dumps(definition, ensure_ascii=False)),
                              unk_token_id=larger.unk_token_id, sep_token_id=larger.sep_token_id,
                              pad_token_id=larger.pad_token_id, cls_token_id=larger.cls_token_id,
                              mask_token_id=larger.mask_token_id, extra_special_ids=larger.extra_special_ids)
    return tokenizer_fingerprint(truncated) == tokenizer_fingerprint(smaller)
