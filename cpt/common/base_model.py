"""Facts about a base model dir: its config.json (positions) and its tokenizer, loaded with the
`tokenizers` library alone (its weights: cpt.common.weights).

    check_fits_positions(seq_length, model_dir, fix="pass --max-seq-length 512 or less")

`transformers.AutoTokenizer` builds the same Rust tokenizer, but importing transformers (and with it
torch) costs about 3 CPU-seconds, which on a small corpus was most of `cpt tokenize`'s wall time.
This loader reads the same files the way transformers' BERT tokenizer does:

- `tokenizer.json` when present (the full definition: vocab, normalizer, pre-tokenizer);
- else `vocab.txt` + the settings of `tokenizer_config.json` (`do_lower_case`,
  `tokenize_chinese_chars`, `strip_accents`, special tokens), built as a WordPiece with a BERT
  normalizer and pre-tokenizer, exactly as transformers' `BertTokenizer` builds it.

tests/data/test_tokenization.py checks that the ids equal AutoTokenizer's on real text for both forms.

    tokenizer = load_tokenizer(Path("base"))
    tokenizer.encode_batch(["今天天气很好"])       # tokenizers.Encoding objects, no [CLS]/[SEP]
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cpt.common.files import read_json
from cpt.errors import BadInput, first_line

DEFAULT_MAX_POSITIONS = 512  # BERT's, when config.json does not say
# The files a model dir's tokenizer is read from (load_tokenizer_dir): what travels with converted weights.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def max_positions(model_dir: Path) -> int:
    """The longest sequence the model's position embeddings cover (config.json max_position_embeddings)."""
    return int((read_json(Path(model_dir) / "config.json") or {}).get("max_position_embeddings", DEFAULT_MAX_POSITIONS))


def check_fits_positions(seq_length: int, model_dir: Path, *, what: str, fix: str) -> None:
    """BadInput when sequences of `seq_length` tokens are longer than the model has positions for.
    `what` names the length (e.g. "--max-seq-length 1024"), `fix` says what to do instead."""
    positions = max_positions(model_dir)
    if seq_length > positions:
        raise BadInput(f"{what} exceeds the model's max_position_embeddings {positions} "
                       f"({Path(model_dir) / 'config.json'}); {fix.format(positions=positions)}")


SPECIAL_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "mask_token": "[MASK]"}


@dataclass(frozen=True)
class BaseTokenizer:
    """A `tokenizers.Tokenizer` and the ids of its special tokens (the names transformers uses)."""

    backend_tokenizer: object  # tokenizers.Tokenizer
    unk_token_id: int
    sep_token_id: int
    pad_token_id: int
    cls_token_id: int
    mask_token_id: int
    extra_special_ids: tuple[int, ...] = ()

    @property
    def all_special_ids(self) -> list[int]:
        return [self.unk_token_id, self.sep_token_id, self.pad_token_id, self.cls_token_id, self.mask_token_id,
                *self.extra_special_ids]

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.backend_tokenizer.id_to_token(token_id) for token_id in ids]

    def encode_batch(self, texts: list[str]) -> list:
        """Encodings of `texts` without special tokens; literal "[SEP]" in a text is text, not a special token."""
        self.backend_tokenizer.encode_special_tokens = True
        return self.backend_tokenizer.encode_batch(texts, add_special_tokens=False)

    def encode_with_specials(self, texts: list[str], max_seq_length: int) -> list[list[int]]:
        """`[CLS] text [SEP]` ids per text, the text cut to fit max_seq_length (transformers' truncation=True)."""
        body = max_seq_length - 2
        return [[self.cls_token_id, *encoding.ids[:body], self.sep_token_id] for encoding in self.encode_batch(texts)]


def load_tokenizer(base_model: Path) -> BaseTokenizer:
    """The base model's tokenizer; its vocab must match the model config's vocab_size."""
    base_model = Path(base_model)
    if not base_model.is_dir():
        raise BadInput(f"--base-model {base_model}: no such directory; point it at a Hugging Face model dir")
    if not (base_model / "config.json").is_file():
        raise BadInput(f"--base-model {base_model}: no config.json; it must be a Hugging Face model dir")
    tokenizer = load_tokenizer_dir(base_model, label=f"--base-model {base_model}")
    config = read_json(base_model / "config.json") or {}
    vocab_size = config.get("vocab_size")
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise BadInput(
            f"--base-model {base_model}: tokenizer has {len(tokenizer)} tokens but config.json vocab_size is "
            f"{vocab_size}; use the vocab the model was trained with"
        )
    return tokenizer


def load_tokenizer_dir(directory: Path, label: str | None = None) -> BaseTokenizer:
    """The tokenizer stored in `directory` (tokenizer files only, no config.json needed: e.g. the
    extended tokenizer `cpt tokenize --extend-vocab` keeps in RUN_DIR/tokenizer/)."""
    directory = Path(directory)
    label = label or str(directory)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise BadInput(f"{label}: no tokenizer.json or vocab.txt; copy the base model's tokenizer files")
    settings = _tokenizer_settings(directory)
    try:
        backend = _read_backend(directory, settings)
    except Exception as error:  # tokenizers raises plain Exception for a malformed file
        raise BadInput(f"{label}: cannot load its tokenizer ({first_line(error)})") from None
    return _with_special_ids(backend, settings, directory)


def tokenizer_fingerprint(tokenizer: BaseTokenizer) -> str:
    """Hash of what decides the ids cpt stores: vocab and model, normalizer, pre-tokenizer, added and special tokens.

    Post-processor, decoder, padding and truncation settings are left out: they do not change the ids
    cpt stores, and leaving them out makes a tokenizer.json and the vocab.txt it came from hash alike."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    added = sorted((token["id"], token["content"], token.get("special", False))
                   for token in definition.get("added_tokens") or [])
    essential = {key: definition.get(key) for key in ("model", "normalizer", "pre_tokenizer")}
    essential["added_tokens"] = [entry for entry in added if not entry[2]]  # special ones are never matched in text
    essential["special_ids"] = tokenizer.all_special_ids  # [CLS]/[SEP] are written into shards, [MASK] used in training
    return hashlib.sha256(json.dumps(essential, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _tokenizer_settings(base_model: Path) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json (either may be absent)."""
    settings: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = base_model / name
        if path.is_file():
            data = read_json(path)
            if not isinstance(data, dict):
                raise BadInput(f"{path}: not a JSON object; fix or delete the file")
            settings.update({key: _token_text(value) for key, value in data.items()})
    return settings


def _token_text(value):
    """Special tokens are written as "[CLS]" or as {"content": "[CLS]", ...}."""
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    if isinstance(value, list):
        return [_token_text(item) for item in value]
    return value


def _read_backend(base_model: Path, settings: dict):
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordPiece

    if (base_model / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(base_model / "tokenizer.json"))
        if json.loads(backend.to_str())["model"].get("type") == "WordPiece":
            # transformers' BERT tokenizer keeps the file's vocab but rebuilds normalizer and
            # pre-tokenizer from tokenizer_config.json (do_lower_case defaults to True): so does cpt.
            _set_bert_text_rules(backend, settings)
        return backend
    vocab = _read_vocab(base_model / "vocab.txt")
    unk_token = settings.get("unk_token") or SPECIAL_DEFAULTS["unk_token"]
    backend = Tokenizer(WordPiece(vocab, unk_token=str(unk_token)))
    _set_bert_text_rules(backend, settings)
    backend.decoder = decoders.WordPiece(prefix="##")
    _add_listed_tokens(backend, base_model, settings)
    return backend


def _set_bert_text_rules(backend, settings: dict) -> None:
    from tokenizers import normalizers, pre_tokenizers

    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"),
        lowercase=bool(settings.get("do_lower_case", True)),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()


def _add_listed_tokens(backend, base_model: Path, settings: dict) -> None:
    """Tokens beyond vocab.txt listed in added_tokens.json or tokenizer_config.json's added_tokens_decoder."""
    from tokenizers import AddedToken

    listed: dict[int, tuple[str, bool]] = {}
    added_path = base_model / "added_tokens.json"
    if added_path.is_file():
        added = read_json(added_path)
        if not isinstance(added, dict):
            raise BadInput(f"{added_path}: not a JSON object of token -> id; fix or delete the file")
        listed.update({int(token_id): (str(token), False) for token, token_id in added.items()})
    for token_id, entry in (settings.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and "content" in entry:
            listed[int(token_id)] = (str(entry["content"]), bool(entry.get("special", False)))
    for token_id, (content, special) in sorted(listed.items()):
        if backend.token_to_id(content) is not None:
            continue
        if special:
            backend.add_special_tokens([AddedToken(content, special=True)])
        else:
            backend.add_tokens([AddedToken(content)])
        if backend.token_to_id(content) != token_id:
            raise BadInput(f"{base_model}: added token {content!r} should have id {token_id} but lands on "
                           f"{backend.token_to_id(content)}; the added tokens must follow vocab.txt without gaps")


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token per line, id = line number (transformers' load_vocab; a repeated token keeps its last id)."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            vocab[line.rstrip("\n")] = index
    return vocab


def _with_special_ids(backend, settings: dict, base_model: Path) -> BaseTokenizer:
    ids = {}
    for name, default in SPECIAL_DEFAULTS.items():
        token = settings.get(name) or default
        token_id = backend.token_to_id(str(token))
        if token_id is None:
            raise BadInput(f"--base-model {base_model}: the tokenizer has no {name} {token!r}; "
                           "use the base model's own vocab.txt/tokenizer.json")
        ids[f"{name}_id"] = token_id
    extra = [backend.token_to_id(str(token)) for token in settings.get("additional_special_tokens") or []]
    return BaseTokenizer(backend_tokenizer=backend, extra_special_ids=tuple(i for i in extra if i is not None), **ids)
