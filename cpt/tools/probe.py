"""`cpt probe --model DIR [--model DIR ...] --train FILE --test FILE`: a quick downstream check.

Fine-tunes a sequence classifier (AutoModelForSequenceClassification: the model's encoder and the
pooler the export carried over, plus a new linear head) for a bounded number of steps, then reports
accuracy and macro-F1 on the test file. Every model gets the same settings, the same head
initialisation, batches and dropout (all drawn from --seed), so differences come from the encoders.

    results = probe_models([Path("base"), Path("run/model")], ProbeConfig(train=Path("a.tsv"), test=Path("b.tsv")))
    probe_and_print(config)  # `cpt probe`: the same, as a table (or JSON) on stdout

Labelled files: .tsv / .csv rows `label<TAB>text` (a header row is optional; without one the label
is column 0 and the text the last column, like book_review_cls.tsv), or .jsonl objects with
"label" and "text" fields. --label-column / --text-column take a header name or a 0-based index.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cpt.config import ProbeConfig, check
from cpt.errors import BadInput, first_line
from cpt.tools.eval import models_table, print_report, report_settings

LABEL_COLUMN_GUESSES = ("label", "labels", "class", "category", "target", "sentiment", "y")




def _column_index(spec: str, names: list[str] | None, width: int, path: Path, flag: str) -> int:
    """A column given by 0-based index or header name."""
    if spec.isdigit():
        if int(spec) >= width:
            raise BadInput(f"{path}: {flag} {spec} is out of range; the file has {width} column(s)")
        return int(spec)
    if names is None:
        raise BadInput(f"{path}: {flag} {spec!r} names a column, but the file has no header row; pass a 0-based index")
    if spec not in names:
        raise BadInput(f"{path}: {flag} {spec!r} is missing; the header has: {', '.join(names)}")
    return names.index(spec)


def _guess_columns(first_row: list[str], text_column: str, label_column: str, path: Path) -> tuple[int, int, bool]:
    """(text index, label index, first row is a header) of a table."""
    from cpt.data.prepare import choose_text_column

    width = len(first_row)
    if width < 2:
        raise BadInput(f"{path}: rows have {width} column; a labelled file needs a label and a text column "
                       "(label<TAB>text)")
    text_index, has_header = choose_text_column(first_row, text_column, path)
    names = [cell.strip() for cell in first_row] if has_header else None
    lowered = [name.lower() for name in names] if names else []
    if label_column:
        label_index = _column_index(label_column, names, width, path, "--label-column")
    elif names:
        label_index = next((lowered.index(g) for g in LABEL_COLUMN_GUESSES if g in lowered), -1)
        if label_index < 0:
            raise BadInput(f"{path}: no label column in the header ({', '.join(names)}); pass --label-column NAME")
    else:
        label_index = 0 if text_index != 0 else 1
    if label_index == text_index:
        raise BadInput(f"{path}: the label and text columns are both column {label_index}; "
                       "pass --label-column and --text-column")
    return text_index, label_index, has_header


def read_labelled(path: Path, text_column: str = "", label_column: str = "", *, flag: str = "--train") -> list[tuple[str, str]]:
    """(label, cleaned text) pairs of a .tsv/.csv/.jsonl file, in file order; empty texts are dropped."""
    from cpt.data.prepare import clean_text, decoded_lines, format_of

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{flag} {path}: no such file; pass a labelled .tsv/.csv (label<TAB>text) or .jsonl file")
    kind = format_of(path)
    counts: Counter = Counter()
    lines = (line for _number, line in decoded_lines(path, "error", counts))
    examples: list[tuple[str, str]] = []
    if kind == ".jsonl":
        text_key, label_key = text_column or "text", label_column or "label"
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise BadInput(f"{path}:{number}: not valid JSON; each line must be one object") from None
            if not isinstance(record, dict) or label_key not in record:
                raise BadInput(f"{path}:{number}: the label field {label_key!r} is missing; pass --label-column NAME")
            if text_key not in record:
                raise BadInput(f"{path}:{number}: the text field {text_key!r} is missing; pass --text-column NAME")
            examples.append((str(record[label_key]).strip(), clean_text(str(record[text_key]))))
    elif kind in (".tsv", ".csv"):
        delimiter = "\t" if kind == ".tsv" else ","
        reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if kind == ".tsv" else csv.QUOTE_MINIMAL)
        try:
            first = next(reader, None)
            if first is None:
                raise BadInput(f"{flag} {path}: the file is empty")
            text_index, label_index, has_header = _guess_columns(first, text_column, label_column, path)
            rows = reader if has_header else _chain(first, reader)
            needed = max(text_index, label_index)
            for row in rows:
                if needed < len(row):
                    examples.append((row[label_index].strip(), clean_text(row[text_index])))
        except csv.Error as error:
            raise BadInput(f"{path}:{reader.line_num}: malformed row ({error})") from None
    else:
        raise BadInput(f"{flag} {path}: use a .tsv/.csv (label<TAB>text) or .jsonl file for labelled examples")
    examples = [(label, text) for label, text in examples if label and text]
    if not examples:
        raise BadInput(f"{flag} {path}: no labelled example with a non-empty label and text")
    return examples


def _chain(first, rest):
    yield first
    yield from rest


def macro_f1(true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the classes present in `true` or `predicted` (sklearn's default labels)."""
    scores = []
    for label in np.union1d(true, predicted):
        tp = int(np.sum((predicted == label) & (true == label)))
        fp = int(np.sum((predicted == label) & (true != label)))
        fn = int(np.sum((predicted != label) & (true == label)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def load_classifier(model_dir: Path, num_labels: int, device: torch.device):
    """The model dir as a sequence classifier; the new head is drawn from torch's global generator."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=num_labels, attn_implementation="sdpa", local_files_only=True,
            trust_remote_code=False, dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise BadInput(f"--model {model_dir}: cannot load it as a sequence classifier ({first_line(error)})") from None
    return model.to(device)


def _encode(tokenizer, texts: list[str], max_seq_length: int) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_with_specials(texts, max_seq_length)]


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.from_numpy(row)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def _batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Example indices of each step: a fresh seeded permutation per epoch, the same for every model."""
    batches, epoch, order, position = [], 0, np.zeros(0, dtype=np.int64), 0
    while len(batches) < steps:
        if position >= len(order):
            order, position = np.random.default_rng([seed, epoch, 0x9E0BE]).permutation(num_examples), 0
            epoch += 1
        batches.append(order[position : position + batch_size])
        position += batch_size
    return batches


def finetune_and_score(model_dir: Path, tokenizer, train_ids: list[np.ndarray], train_labels: np.ndarray,
                       test_ids: list[np.ndarray], test_labels: np.ndarray, num_labels: int,
                       settings: ProbeConfig, device: torch.device) -> dict:
    from cpt.training.model import parameter_groups
    from cpt.training.schedule import learning_rate_at

    torch.manual_seed(settings.seed)  # the new head: the same initial weights for every model of one shape
    model = load_classifier(model_dir, num_labels, device)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr, eps=1e-6,
                                  foreach=True)  # one op per step for all tensors: far fewer CPU dispatches
    warmup_steps = max(1, settings.steps // 10)
    pad_id = tokenizer.pad_token_id or 0
    model.train()
    losses = []
    for step, picks in enumerate(_batch_order(len(train_ids), settings.steps, settings.batch_size, settings.seed)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, peak_lr=settings.lr, warmup_steps=warmup_steps,
                                           max_steps=settings.steps, min_lr_ratio=0.0)
        torch.manual_seed(settings.seed * 1_000_003 + step)  # dropout draws: the same for every model
        input_ids, attention_mask = _pad([train_ids[i] for i in picks], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # (B, C)
        loss = F.cross_entropy(logits.float(), torch.from_numpy(train_labels[picks]).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    predicted = np.zeros(len(test_ids), dtype=np.int64)
    by_length = np.argsort([len(ids) for ids in test_ids], kind="stable")  # less padding per batch
    with torch.no_grad():
        for first in range(0, len(by_length), 64):
            picks = by_length[first : first + 64]
            input_ids, attention_mask = _pad([test_ids[i] for i in picks], pad_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            predicted[picks] = logits.argmax(dim=-1).cpu().numpy()
    tail = losses[-max(1, len(losses) // 10):]
    return {"model": str(model_dir), "accuracy": float(np.mean(predicted == test_labels)),
            "macro_f1": macro_f1(test_labels, predicted), "final_train_loss": float(np.mean(tail))}


def probe_models(model_dirs: list[Path], settings: ProbeConfig) -> dict:
    """Fine-tune and score each model: {"settings": ..., "data": ..., "models": [...]}."""
    from cpt.common.runtime import info
    from cpt.tools.eval import shared_tokenizer
    from cpt.training.distributed import pick_device

    check(settings)
    model_dirs = [Path(model_dir) for model_dir in model_dirs]
    tokenizer = shared_tokenizer(model_dirs)
    train = read_labelled(settings.train, settings.text_column, settings.label_column, flag="--train")
    test = read_labelled(settings.test, settings.text_column, settings.label_column, flag="--test")
    if settings.max_train_examples:
        train = train[: settings.max_train_examples]
    if settings.max_test_examples:
        test = test[: settings.max_test_examples]
    classes = sorted({label for label, _text in train})
    if len(classes) < 2:
        raise BadInput(f"--train {settings.train}: only one label ({classes[0]!r}); a classifier needs two or more")
    unseen = sorted({label for label, _text in test} - set(classes))
    if unseen:
        raise BadInput(f"--test {settings.test}: labels {', '.join(map(repr, unseen[:5]))} never occur in --train "
                       f"{settings.train}; use files with the same label set")
    index_of = {label: index for index, label in enumerate(classes)}
    train_labels = np.array([index_of[label] for label, _text in train], dtype=np.int64)
    test_labels = np.array([index_of[label] for label, _text in test], dtype=np.int64)
    train_ids = _encode(tokenizer, [text for _label, text in train], settings.max_seq_length)
    test_ids = _encode(tokenizer, [text for _label, text in test], settings.max_seq_length)
    majority = Counter(test_labels.tolist()).most_common(1)[0][1] / len(test_labels)
    info(f"probe: {len(train)} train / {len(test)} test examples, {len(classes)} classes; {settings.steps} steps "
         f"x {settings.batch_size}, lr {settings.lr:g}, seed {settings.seed}; majority-class accuracy {majority:.4f}")
    device = pick_device(settings.device, 0)
    results = []
    for model_dir in model_dirs:
        result = finetune_and_score(model_dir, tokenizer, train_ids, train_labels, test_ids, test_labels,
                                    len(classes), settings, device)
        info(f"probe: {model_dir}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}")
        results.append(result)
    data = {"train_examples": len(train), "test_examples": len(test), "classes": classes,
            "majority_accuracy": majority}
    return {"settings": report_settings(settings), "data": data, "models": results}


def probe_and_print(config: ProbeConfig) -> dict:
    """`cpt probe`: fine-tune and score the --model dirs; a table (or JSON) on stdout, progress on stderr."""
    report = probe_models(list(config.model), config)
    print_report(report, probe_table(report), as_json=config.as_json)
    return report


def probe_table(report: dict):
    settings, data = report["settings"], report["data"]
    caption = (f"{data['train_examples']} train / {data['test_examples']} test examples, "
               f"{len(data['classes'])} classes (majority-class accuracy {data['majority_accuracy']:.4f}); "
               f"{settings['steps']} steps x {settings['batch_size']}, lr {settings['lr']:g}, seed {settings['seed']}")
    columns = [("accuracy", "accuracy", 4), ("macro-F1", "macro_f1", 4), ("final train loss", "final_train_loss", 4)]
    return models_table("Probe: fine-tuned sequence classifier", columns, report["models"], caption)
