"""General-text replay against forgetting (--replay-corpus, --replay-share): its data stages.

The replay corpus goes through the same prepare and tokenize code as the main corpus, with
RUN_DIR/replay/ as their output root: RUN_DIR/replay/corpus/ and RUN_DIR/replay/shards/, each with
its own manifest, resumable and skipped when current like the main ones. It is tokenized with the
tokenizer of the main shards (RUN_DIR/tokenizer/ after --extend-vocab), so both share the ids the
model is trained on. Mixing and the replay val metrics are in cpt/training/batches.py and cpt/training/evaluate.py.

    prepare_replay(prepare_config)      # after prepare_corpus: RUN_DIR/replay/corpus/
    tokenize_replay(tokenize_config)    # after tokenize_corpus: RUN_DIR/replay/shards/
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from cpt.common.files import read_json, require_manifest
from cpt.config import PrepareConfig, TokenizeConfig
from cpt.errors import BadInput

REPLAY_DIR = "replay"


def replay_root(run_dir: Path) -> Path:
    return Path(run_dir) / REPLAY_DIR


def replay_shards_dir(run_dir: Path) -> Path:
    return replay_root(run_dir) / "shards"


def is_prepared(run_dir: Path) -> bool:
    """`cpt prepare --replay-corpus` has run in this run dir."""
    return read_json(replay_root(run_dir) / "corpus" / "manifest.json") is not None


@contextlib.contextmanager
def _named_as_replay():
    """The prepare stage names the option it was given, --corpus: here that is --replay-corpus."""
    try:
        yield
    except BadInput as error:
        raise BadInput(error.message.replace("--corpus", "--replay-corpus").replace("CPT_CORPUS", "CPT_REPLAY_CORPUS")) \
            from None


def check_replay_corpus(config: PrepareConfig) -> None:
    """Fail before any stage runs when a --replay-corpus path names no readable text file."""
    from cpt.data.prepare import resolve_corpus_paths

    with _named_as_replay():
        resolve_corpus_paths(config.replay_corpus, run_dir=config.output)


def prepare_replay(config: PrepareConfig) -> dict:
    """--replay-corpus -> RUN_DIR/replay/corpus/{train,val}.txt + manifest.json, with the main corpus's settings."""
    from cpt.data.prepare import prepare_corpus

    with _named_as_replay():
        return prepare_corpus(dataclasses.replace(config, output=replay_root(config.output),
                                                  corpus=config.replay_corpus, replay_corpus=()))


def tokenize_replay(config: TokenizeConfig) -> dict:
    """RUN_DIR/replay/corpus/ -> RUN_DIR/replay/shards/, with the tokenizer the main shards were made with."""
    from cpt.data.tokenization import tokenize_corpus
    from cpt.data.vocab import added_tokens, extension_dir

    run_dir = Path(config.output)
    main_manifest = require_manifest(run_dir / "shards" / "manifest.json", "cpt tokenize")
    tokenizer_dir = extension_dir(run_dir, main_manifest) if added_tokens(main_manifest) else None
    return tokenize_corpus(dataclasses.replace(config, output=replay_root(run_dir), extend_vocab="off"),
                           tokenizer_dir=tokenizer_dir)
