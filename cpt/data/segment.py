"""Pure helpers that turn jieba word segmentation into per-token "starts a word" flags.

    starts = word_start_offsets("我爱北京天安门", segmenter)      # [0, 1, 2, 4]
    flags = token_word_starts(token_offsets, is_continuation, starts)

Two backends give the same segmentation algorithm and dictionary: `jieba` (the reference, pure
Python) and `rjieba` (jieba-rs, the same dictionary and algorithm in Rust, ~12x faster). `auto`
picks rjieba when it is installed. Their agreement on real text is measured in tests/data/test_segment.py.

jieba-rs keeps an out-of-dictionary run of ASCII letters, digits and `-_.` whole ("HR-V", "3.5mm",
"www.example.com"), where jieba cuts it at every change between alphanumerics and punctuation
("HR" "-" "V"); we re-cut rjieba's ASCII words the way jieba does, which makes the two agree.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cpt.errors import BadInput

SEGMENTER_BACKENDS = ("auto", "rjieba", "jieba")

Segmenter = Callable[[str], list[str]]

# jieba's finalseg splits a non-Chinese run that is not a dictionary word with this pattern.
_JIEBA_ASCII_PIECES = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")
# The words of jieba's default dictionary that this split would break (tests/data/test_segment.py checks the list).
JIEBA_ASCII_DICT_WORDS = frozenset({"AT&T", "c#", "C#", "c++", "C++"})


def _read_user_dict(path: Path) -> list[tuple[str, int | None, str | None]]:
    """Lines of a jieba user dictionary: `word [freq] [tag]`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: cannot read the jieba user dictionary ({error}); pass a UTF-8 text file") from None
    entries = []
    for line in lines:
        parts = line.strip().split()
        if not parts:
            continue
        freq = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        tag = parts[2] if len(parts) > 2 else None
        entries.append((parts[0], freq, tag))
    return entries


def load_segmenter(backend: str = "auto", user_dict: Path | None = None) -> Segmenter:
    """A function text -> list of words whose concatenation is the text."""
    if backend not in SEGMENTER_BACKENDS:
        raise BadInput(f"--segmenter {backend!r} is unknown; use one of {', '.join(SEGMENTER_BACKENDS)}")
    entries = _read_user_dict(user_dict) if user_dict else []
    if backend in ("auto", "rjieba"):
        try:
            import rjieba
        except ImportError:
            if backend == "rjieba":
                raise BadInput("--segmenter rjieba: rjieba is not installed; pip install rjieba or use jieba") from None
        else:
            engine = rjieba.Jieba()
            for word, freq, tag in entries:
                engine.add_word(word, freq, tag)
            return _jieba_compatible(engine.cut, JIEBA_ASCII_DICT_WORDS | {word for word, _freq, _tag in entries})
    import jieba

    jieba.setLogLevel(logging.WARNING)
    engine = jieba.Tokenizer()
    engine.initialize()
    for word, freq, tag in entries:
        engine.add_word(word, freq, tag)
    return lambda text: list(engine.cut(text))


def _jieba_compatible(cut: Segmenter, dictionary_words: frozenset[str]) -> Segmenter:
    """rjieba's cut with ASCII words outside the dictionary re-cut as jieba cuts them."""

    def segment(text: str) -> list[str]:
        words = []
        for word in cut(text):
            if len(word) > 1 and word.isascii() and not word.isalnum() and word not in dictionary_words:
                words.extend(piece for piece in _JIEBA_ASCII_PIECES.split(word) if piece)
            else:
                words.append(word)
        return words

    return segment


def word_start_offsets(text: str, segment: Segmenter) -> np.ndarray:
    """Character offsets where a jieba word starts, sorted. (W,) int64"""
    lengths = np.fromiter((len(word) for word in segment(text)), dtype=np.int64)
    return np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else np.zeros(0, dtype=np.int64)


def token_word_starts(
    token_char_starts: np.ndarray, is_continuation: Sequence[bool] | np.ndarray, word_starts: np.ndarray
) -> np.ndarray:
    """Per token: does it start a word?

    A token starts a word when its first character is where a jieba word starts, or when no
    earlier token shares its word (the first token after a skipped span, such as whitespace,
    that jieba kept inside one "word"). `##` pieces never start a word: WordPiece already says
    they continue the previous token.
    """
    token_char_starts = np.asarray(token_char_starts, dtype=np.int64)  # (N,)
    # Index of the jieba word that contains each token's first character.
    word_index = np.searchsorted(word_starts, token_char_starts, side="right") - 1  # (N,)
    new_word = np.ones(len(token_char_starts), dtype=bool)
    new_word[1:] = word_index[1:] != word_index[:-1]
    return new_word & ~np.asarray(is_continuation, dtype=bool)
