"""`cpt eval --model DIR [--model DIR ...] --corpus PATH`: MLM loss, accuracy and pseudo-perplexity on held-out text.

    report = evaluate_models([Path("base"), Path("run/model")], EvalConfig(corpus=("held_out.txt",)))
    report["models"][1]["mlm_acc"]
    evaluate_and_print(config)  # `cpt eval`: the same, as a table (or JSON) on stdout

Text takes the training path: prepare's readers and `clean_text` (empty and duplicate documents
dropped), then `tokenize_documents` + `build_sequences` (jieba word starts, the same cutting into
max-seq-length pieces, one document per sequence: no packing). Loss and accuracy come from
`cpt.training.evaluate.evaluate_mlm`, the function training validates with: the training masking (mode and
rate, 80/10/10 replacement) at masks drawn per sequence from (seed, EVAL_EPOCH, index). Every model
is scored at the very same masked positions, and `cpt eval --corpus RUN/corpus/val.txt` with the
run's seed and max-seq-length reproduces the val_mlm_loss / val_mlm_acc that metrics.jsonl logged.

Pseudo-perplexity (Salazar et al. 2020, "Masked Language Model Scoring") masks one token at a time:
PPPL = exp(-mean log p(token | all other tokens)). It costs one forward row per scored token, so it is
bounded: the first --pppl-tokens maskable tokens ([CLS]/[SEP]/[UNK] are skipped) of the evaluated
sequences in corpus order, many rows per forward pass. It needs no random masks, so it is exact and
the same for any seed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cpt.config import EvalConfig, check, json_values
from cpt.errors import BadInput

DOCUMENTS_PER_BLOCK = 512  # documents tokenized at once while reading only as far as needed




class TokenizedText:
    """Sequences held in memory behind ShardSet's read interface (what build_batch and evaluate_mlm use)."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray, offsets: np.ndarray):
        self._ids, self._starts, self._offsets = ids, starts, offsets  # (N,) int64, (N,) bool, (S + 1,) int64

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (T,) int64 and word-start flags (T,) bool of sequence `index`."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._ids[start:end], self._starts[start:end]

    def total_tokens(self) -> int:
        return int(self._offsets[-1])


def check_model_dir(model_dir: Path, flag: str = "--model") -> Path:
    """A readable Hugging Face model dir, or a one-line BadInput that names the flag."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BadInput(f"{flag} {model_dir}: no such directory; pass a Hugging Face model dir (e.g. RUN_DIR/model)")
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"{flag} {model_dir}: no config.json; pass a Hugging Face model dir (e.g. RUN_DIR/model)")
    return model_dir


def _with_flag(error: BadInput, flag: str) -> BadInput:
    """The loaders name --base-model; here the user typed another flag."""
    return BadInput(error.message.replace("--base-model", flag))


def shared_tokenizer(model_dirs: list[Path], flag: str = "--model", allow_extended: bool = False):
    """The tokenizer all models share; different vocabularies would make their numbers incomparable.
    allow_extended: a vocab that only appends tokens to the others' (--extend-vocab) is shared too; the
    extended tokenizer is returned (spec_for_smallest_vocab, SmallerVocabView below)."""
    from cpt.common.base_model import load_tokenizer, tokenizer_fingerprint
    from cpt.training.model import check_base_model

    if not model_dirs:
        raise BadInput(f"{flag} is required: one or more Hugging Face model dirs")
    first, first_fingerprint = None, None
    tokenizers = []
    for model_dir in model_dirs:
        check_model_dir(model_dir, flag)
        try:
            check_base_model(model_dir)
            tokenizer = load_tokenizer(model_dir)
        except BadInput as error:
            raise _with_flag(error, flag) from None
        fingerprint = tokenizer_fingerprint(tokenizer)
        tokenizers.append(tokenizer)
        if first is None:
            first, first_fingerprint = (model_dir, tokenizer), fingerprint
        elif fingerprint != first_fingerprint and not (allow_extended and _one_extends_all(tokenizers)):
            raise BadInput(
                f"{flag} {model_dir} and {flag} {first[0]} have different tokenizers (vocab.txt/tokenizer.json "
                "differ); only models that share a vocabulary can be compared on the same token ids"
            )
    return max(tokenizers, key=len) if allow_extended else first[1]


def _one_extends_all(tokenizers: list) -> bool:
    from cpt.common.base_model import tokenizer_fingerprint
    from cpt.data.vocab import extends

    largest = max(tokenizers, key=len)
    return all(tokenizer_fingerprint(other) == tokenizer_fingerprint(largest) or extends(largest, other)
               for other in tokenizers)


def read_documents(corpus: tuple[str, ...], text_column: str = ""):
    """Cleaned, deduplicated, non-empty documents of the corpus paths, in order (a generator), and the counts."""
    from cpt.config import PrepareConfig
    from cpt.data.prepare import resolve_corpus_paths, unique_documents

    # min_chars=1: held-out text keeps short documents; only empty ones and repeats are dropped.
    config = PrepareConfig(corpus=tuple(corpus), text_column=text_column, min_chars=1)
    paths = resolve_corpus_paths(config.corpus)
    counts: Counter = Counter()

    def documents():
        for _hash_value, text in unique_documents(paths, config, counts):
            counts["documents"] += 1
            yield text

    return documents(), counts


def tokenize_held_out(settings: EvalConfig, tokenizer) -> tuple[TokenizedText, dict[str, int]]:
    """The first `max_sequences` sequences of the corpus, made exactly as `cpt tokenize` makes them (unpacked)."""
    from cpt.data.segment import load_segmenter
    from cpt.data.tokenization import build_sequences, cut_points, tokenize_documents

    documents, counts = read_documents(settings.corpus, settings.text_column)
    segment = load_segmenter("auto")
    id_parts, start_parts, lengths = [], [], []
    pieces_per_document: list[int] = []
    block: list[str] = []

    def flush() -> None:
        tokenized = tokenize_documents(block, tokenizer, segment)
        pieces_per_document.extend(len(cut_points(starts, settings.max_seq_length - 2)) if len(ids) else 0
                                   for ids, starts in tokenized)
        ids, starts, offsets = build_sequences(tokenized, settings.max_seq_length, False, tokenizer.cls_token_id,
                                               tokenizer.sep_token_id)
        id_parts.append(ids)
        start_parts.append(starts)
        lengths.extend(np.diff(offsets).tolist())
        block.clear()

    for text in documents:
        block.append(text)
        if len(block) == DOCUMENTS_PER_BLOCK:
            flush()
            if len(lengths) >= settings.max_sequences:
                break
    if block:
        flush()
    if not lengths:
        raise BadInput(f"--corpus {' '.join(settings.corpus)}: no text left after cleaning; pass held-out documents")
    lengths = lengths[: settings.max_sequences]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    ids = np.concatenate(id_parts)[: offsets[-1]].astype(np.int64)
    starts = np.concatenate(start_parts)[: offsets[-1]].astype(bool)
    # documents whose pieces make up the evaluated sequences (the last one possibly in part)
    documents_used = int(np.searchsorted(np.cumsum(pieces_per_document), len(lengths)) + 1)
    return TokenizedText(ids, starts, offsets), {"documents": documents_used, "duplicates_skipped": counts["duplicates"]}


@torch.no_grad()
def pseudo_perplexity(model, sequences: TokenizedText, *, mask_token_id: int, special_ids: np.ndarray,
                      max_tokens: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """PPPL over the first `max_tokens` maskable tokens; each forward row masks one token of one sequence."""
    from cpt.training.model import IGNORE_INDEX, masked_lm_logits

    picks: list[tuple[int, int]] = []  # (sequence index, position)
    for index in range(len(sequences)):
        if len(picks) >= max_tokens:
            break
        ids, _starts = sequences.sequence(index)
        positions = np.flatnonzero(~np.isin(ids, special_ids))[: max_tokens - len(picks)]
        picks.extend((index, int(position)) for position in positions)
    if not picks:
        return {"pseudo_perplexity": math.nan, "pppl_tokens": 0}
    was_training = model.training
    model.eval()
    log_prob_sum = 0.0
    for first in range(0, len(picks), batch_size):
        chunk = picks[first : first + batch_size]
        rows = [sequences.sequence(index)[0] for index, _position in chunk]
        width = max(len(row) for row in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), pads are masked out anyway
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, (_index, position)) in enumerate(zip(rows, chunk, strict=True)):
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, position] = int(ids[position])
            input_ids[row, position] = mask_token_id
        # One label per row, so the selected logits come back in row order. (B, V), (B,)
        logits, targets = masked_lm_logits(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])
        log_prob_sum += float(log_probs.double().sum())
    model.train(was_training)
    return {"pseudo_perplexity": math.exp(-log_prob_sum / len(picks)), "pppl_tokens": len(picks)}


def evaluate_models(model_dirs: list[Path], settings: EvalConfig) -> dict:
    """Score each model on the same sequences and masks: {"settings": ..., "data": ..., "models": [...]}."""
    from cpt.common.base_model import check_fits_positions
    from cpt.common.files import read_json
    from cpt.common.runtime import info
    from cpt.training.batches import masking_spec_for
    from cpt.training.distributed import DistContext, pick_device
    from cpt.training.evaluate import evaluate_mlm
    from cpt.training.model import MaskedLMObjective, load_mlm_model

    check(settings)
    model_dirs = [Path(model_dir) for model_dir in model_dirs]
    tokenizer = shared_tokenizer(model_dirs, allow_extended=True)
    for model_dir in model_dirs:
        check_fits_positions(settings.max_seq_length, model_dir, what=f"--max-seq-length {settings.max_seq_length}",
                             fix="pass --max-seq-length {positions} or less")
    sequences, counts = tokenize_held_out(settings, tokenizer)
    spec = masking_spec_for(tokenizer, settings.masking, settings.mask_prob, settings.span_p, settings.span_max)
    smallest_vocab = min((read_json(model_dir / "config.json") or {}).get("vocab_size", len(tokenizer))
                         for model_dir in model_dirs)
    if smallest_vocab < len(tokenizer):  # a base and its --extend-vocab export: the same targets for both
        spec = spec_for_smallest_vocab(spec, smallest_vocab)
        info(f"eval: the models' vocabs differ by {len(tokenizer) - smallest_vocab} appended tokens; those and "
             "[UNK] are not targets, and models without them see [UNK] there")
    device = pick_device(settings.device, 0)
    context = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    info(f"eval: {len(sequences)} sequences ({sequences.total_tokens()} tokens) from {counts['documents']} documents; "
         f"{settings.masking} masks at {settings.mask_prob:.0%}, seed {settings.seed}")
    results = []
    for model_dir in model_dirs:
        try:
            model = load_mlm_model(model_dir, device).eval()
        except BadInput as error:
            raise _with_flag(error, "--model") from None
        seen = sequences
        if model.config.vocab_size < len(tokenizer):
            seen = SmallerVocabView(sequences, model.config.vocab_size, tokenizer.unk_token_id)
        metrics = evaluate_mlm(MaskedLMObjective(model), seen, spec, seed=settings.seed,
                               max_sequences=settings.max_sequences, micro_batch_size=settings.batch_size,
                               context=context)
        result = {"model": str(model_dir), "mlm_loss": metrics["val_mlm_loss"], "mlm_acc": metrics["val_mlm_acc"],
                  "masked_tokens": metrics["val_masked_tokens"]}
        if settings.pppl_tokens > 0:
            result.update(pseudo_perplexity(model, seen, mask_token_id=tokenizer.mask_token_id,
                                            special_ids=spec.special_ids, max_tokens=settings.pppl_tokens,
                                            batch_size=settings.batch_size, device=device))
        results.append(result)
        info(f"eval: {model_dir}: mlm_loss {result['mlm_loss']:.4f}, mlm_acc {result['mlm_acc']:.4f}"
             + (f", pseudo-perplexity {result['pseudo_perplexity']:.2f}" if "pseudo_perplexity" in result else ""))
        del model
    data = {**counts, "sequences": len(sequences), "tokens": sequences.total_tokens()}
    return {"settings": report_settings(settings), "data": data, "models": results}


def report_settings(config) -> dict:
    """A tool config as a report's JSON "settings": what was measured, without the models and output form."""
    return {key: value for key, value in json_values(config).items() if key not in ("model", "as_json")}


def evaluate_and_print(config: EvalConfig) -> dict:
    """`cpt eval`: score the --model dirs; a table (or JSON) on stdout, progress on stderr."""
    report = evaluate_models(list(config.model), config)
    print_report(report, eval_table(report), as_json=config.as_json)
    return report


def eval_table(report: dict):
    settings, data = report["settings"], report["data"]
    first = report["models"][0]
    pppl = f"pseudo-perplexity over the first {first['pppl_tokens']} tokens" if "pppl_tokens" in first else \
        "pseudo-perplexity skipped"
    caption = (f"{data['sequences']} sequences ({data['tokens']} tokens) of {', '.join(settings['corpus'])}, "
               f"max length {settings['max_seq_length']}; {first['masked_tokens']} tokens at fixed "
               f"{settings['masking']} masks ({settings['mask_prob']:.0%}, seed {settings['seed']}); {pppl}")
    columns = [("mlm_loss", "mlm_loss", 4), ("mlm_acc", "mlm_acc", 4), ("pseudo-perplexity", "pseudo_perplexity", 2)]
    return models_table("Masked-LM evaluation on held-out text", columns, report["models"], caption)


def models_table(title: str, columns: list[tuple[str, str, int]], models: list[dict], caption: str):
    """A rich table with one row per model; columns are (header, result key, decimals)."""
    from rich.table import Table

    def shown(number: float | None, digits: int) -> str:
        return "–" if number is None or math.isnan(number) else f"{number:.{digits}f}"

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("model")
    for header, _key, _digits in columns:
        table.add_column(header, justify="right")
    for result in models:
        table.add_row(result["model"], *(shown(result.get(key), digits) for _header, key, digits in columns))
    return table


def print_report(report: dict, table, *, as_json: bool) -> None:
    """A tool's report on stdout: JSON (NaN as null, which reads everywhere) or its rich table."""
    if not as_json:
        from rich.console import Console

        Console(highlight=False).print(table)
        return

    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        return value

    print(json.dumps(clean(report), ensure_ascii=False, indent=2))


# --- a base and its extended export, scored on the same masks ----------------------------------------------

def spec_for_smallest_vocab(spec, vocab_size: int):
    """A MaskingSpec under which models of `vocab_size` and of the extended vocab draw the same masks on the same
    targets: added ids (>= vocab_size) are never targets nor random replacements, and neither is [UNK], which the
    smaller model sees in their place (both as plain non-targets, so the two views group words alike)."""
    import dataclasses

    import numpy as np

    is_special_id = spec.is_special_id.copy()
    is_special_id[vocab_size:] = True
    return dataclasses.replace(
        spec, special_ids=np.flatnonzero(is_special_id).astype(np.int64), is_special_id=is_special_id,
        random_token_ids=spec.random_token_ids[spec.random_token_ids < vocab_size], unk_token_id=None)


class SmallerVocabView:
    """Tokenized text as a model with a smaller vocab sees it: ids it lacks (the added tokens) read as [UNK]."""

    def __init__(self, sequences, vocab_size: int, unk_token_id: int):
        self._sequences, self._vocab_size, self._unk_token_id = sequences, vocab_size, unk_token_id

    def __len__(self) -> int:
        return len(self._sequences)

    def sequence(self, index: int):
        import numpy as np

        ids, starts = self._sequences.sequence(index)
        return np.where(ids >= self._vocab_size, self._unk_token_id, ids), starts

    def total_tokens(self) -> int:
        return self._sequences.total_tokens()
