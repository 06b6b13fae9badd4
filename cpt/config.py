"""One typed config per command: frozen dataclasses whose fields are also the CLI's options.

Each field carries its help text; `cli.py` turns every field into `--flag-name` (or an argument).
The four stage configs also read `CPT_FLAG_NAME` from the environment (precedence: CLI flag > env
var > default): they are what a job's configmap sets. The other commands (eval, probe, convert, ...)
take flags only, so a job's CPT_MAX_SEQ_LENGTH never leaks into `cpt eval`. `problems()` reports
every invalid value at once, so a user fixes a command in one go.

    config = TrainConfig(output=Path("run"), base_model=Path("base"), max_steps=100)
    check(config)  # raises BadInput naming every bad setting
    run = check(stage_config(RunConfig, {"corpus": ("data/",), "output": Path("run"), ...}))  # options -> config
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cpt.errors import BadInput, CptError, UsageError

DOC_SEPARATORS = ("line", "blank-line")
DECODE_ERROR_POLICIES = ("error", "skip", "replace")
SEGMENTER_BACKENDS = ("auto", "rjieba", "jieba")
MASKING_MODES = ("wwm+span", "wwm", "span", "token")
BEST_METRICS = ("val_mlm_acc", "val_mlm_loss")
EXPORT_FORMATS = ("both", "safetensors", "bin")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
REQUIRED = dataclasses.MISSING  # option(REQUIRED, ...): no default; the CLI demands it (exit 2 without it)


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), positional: bool = False, flag: str = "",
           required: bool = False) -> Any:
    """A config field that is also a CLI option; `choices` are validated and listed in --help.
    positional: an argument instead of an option; flag: the option's name when it is not --field-name
    (a bool with a flag is a plain switch, else --x/--no-x); required: the CLI demands it although the
    Python default lets code leave it out (REQUIRED does both)."""
    metadata = {"help": help, "choices": choices, "positional": positional, "flag": flag,
                "required": required or default is REQUIRED}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """`cpt prepare`: raw corpus files -> RUN_DIR/corpus/{train,val}.txt + manifest.json."""

    output: Path = option(None, "Run directory: every stage reads and writes under it.")
    corpus: tuple[str, ...] = option(
        (), "Corpus file, directory (recursive) or glob; repeat for several. .txt/.jsonl/.csv/.tsv, optionally .gz."
    )
    doc_separator: str = option("line", "How .txt files separate documents.", choices=DOC_SEPARATORS)
    text_field: str = option("text", "JSON field that holds the text in .jsonl files.")
    text_column: str = option("", "Column (name or 0-based index) of the text in .csv/.tsv; default: 'text' or the last.")
    on_decode_error: str = option("error", "Invalid UTF-8: stop with file:line, skip the line, or replace bytes.",
                                  choices=DECODE_ERROR_POLICIES)
    min_chars: int = option(10, "Drop documents shorter than this many characters after cleaning.")
    val_fraction: float = option(0.01, "Share of documents held out for validation (by document hash).")
    max_val_docs: int = option(2000, "At most this many validation documents.")
    replay_corpus: tuple[str, ...] = option(
        (), "General-domain text replayed during training against forgetting (--replay-share of each batch): files, "
        "directories or globs like --corpus, prepared and tokenized the same way into RUN_DIR/replay/."
    )
    overwrite: bool = option(False, "Allow reusing an output dir that holds a different run (its files are replaced).")

    def problems(self) -> list[str]:
        found = _common_problems(self)
        if not self.corpus:
            found.append("--corpus / CPT_CORPUS is required: a file, directory or glob of your text")
        if self.min_chars < 1:
            found.append(f"--min-chars {self.min_chars} must be >= 1")
        if not (0.0 <= self.val_fraction < 0.5) or math.isnan(self.val_fraction):
            found.append(f"--val-fraction {self.val_fraction} must be in [0, 0.5)")
        if self.max_val_docs < 0:
            found.append(f"--max-val-docs {self.max_val_docs} must be >= 0")
        return found


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """`cpt tokenize`: corpus/*.txt -> shards/{train,val}/ (token ids, word-start flags, index)."""

    output: Path = option(None, "Run directory: every stage reads and writes under it.")
    base_model: Path = option(None, "Base model dir (Hugging Face format: config.json, vocab/tokenizer, weights).")
    max_seq_length: int = option(512, "Tokens per sequence including [CLS] and [SEP].")
    pack_documents: bool = option(False, "Fill sequences with several short documents (separated by [SEP]).")
    jieba_dict: Path | None = option(None, "A jieba user dictionary (word [freq] [tag] per line).")
    segmenter: str = option("auto", "Word segmenter: rjieba (fast, same algorithm) or jieba.", choices=SEGMENTER_BACKENDS)
    workers: int = option(0, "Tokenizer processes; 0 = one per CPU core. Output is identical for any count.")
    extend_vocab: str = option("off", "Append tokens to the vocab (existing ids unchanged): auto = characters that are "
                               "[UNK] in the base vocab and frequent in the train split (e.g. “ ” … —); FILE = one "
                               "token per line; off.")
    extend_vocab_min_count: int = option(10, "--extend-vocab auto: add a character seen at least this often.")
    extend_vocab_max: int = option(200, "--extend-vocab auto: add at most this many characters (the most frequent).")
    overwrite: bool = option(False, "Allow reusing an output dir that holds a different run (its files are replaced).")

    def problems(self) -> list[str]:
        found = _common_problems(self)
        if self.extend_vocab not in ("off", "auto") and not Path(self.extend_vocab).is_file():
            found.append(f"--extend-vocab {self.extend_vocab}: not auto, off or an existing file of tokens (one per line)")
        if self.extend_vocab_min_count < 1:
            found.append(f"--extend-vocab-min-count {self.extend_vocab_min_count} must be >= 1")
        if self.extend_vocab_max < 1:
            found.append(f"--extend-vocab-max {self.extend_vocab_max} must be >= 1")
        if self.max_seq_length < 8:
            found.append(f"--max-seq-length {self.max_seq_length} must be >= 8")
        if self.workers < 0:
            found.append(f"--workers {self.workers} must be >= 0 (0 = one per core)")
        if self.jieba_dict is not None and not Path(self.jieba_dict).is_file():
            found.append(f"--jieba-dict {self.jieba_dict}: no such file")
        return found


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """`cpt train`: shards -> checkpoints/step-N/, best.json, metrics.jsonl."""

    output: Path = option(None, "Run directory: every stage reads and writes under it.")
    base_model: Path = option(None, "Base model dir (Hugging Face format: config.json, vocab/tokenizer, weights).")
    masking: str = option("wwm+span", "Masking: spans of whole words, whole words, token spans or tokens.",
                          choices=MASKING_MODES)
    mask_prob: float = option(0.15, "Share of each sequence's non-special tokens to predict.")
    span_p: float = option(0.2, "Span length (in words or tokens) ~ geometric(p), capped by --span-max.")
    span_max: int = option(10, "Longest span in words (or tokens in span mode).")
    micro_batch_size: str = option("auto", "Sequences per forward/backward pass on each device, or auto: the largest "
                                   "that fits on CUDA (searched, cached in RUN_DIR), up to 16 on CPU.")
    global_batch_size: int = option(32, "Sequences per optimizer step over all devices (= micro x accum x devices).")
    max_steps: int = option(50000, "Optimizer steps to train.")
    lr: float = option(5e-5, "Peak learning rate (AdamW). 5e-5 suits continued pretraining of a large BERT.")
    warmup_steps: int = option(-1, "Linear warmup steps; -1 = 1% of --max-steps.")
    min_lr_ratio: float = option(0.0, "Learning rate at the last step, as a share of --lr (linear decay).")
    head_warmup: str = option("auto", "Train the MLM head alone first (encoder and embeddings frozen): auto = when the "
                              "step-0 check finds the base's head untrained, for up to 1000 steps (10% of "
                              "--max-steps at most) until val loss stops improving; N = up to N steps; off. "
                              "Counted in --max-steps.")
    head_warmup_lr: float = option(1e-3, "Learning rate of the head warm-up phase (constant; AdamW).")
    weight_decay: float = option(0.01, "AdamW weight decay (never on biases and LayerNorm).")
    grad_clip: float = option(1.0, "Clip the gradient norm to this; 0 disables.")
    eval_interval: int = option(1000, "Evaluate on the validation shards every N steps (and at step 0).")
    eval_max_sequences: int = option(2000, "Evaluate on at most this many validation sequences.")
    save_interval: int = option(10000, "Save a checkpoint every N steps (and at the end); each is evaluated.")
    keep_checkpoints: int = option(2, "Keep this many newest checkpoints, plus the best one.")
    best_metric: str = option("val_mlm_acc", "Metric that picks the best checkpoint.", choices=BEST_METRICS)
    resume: str = option("auto", "auto: continue from the newest valid checkpoint; never: refuse if any; or a step dir.")
    seed: int = option(42, "Seed for data order, masks and dropout.")
    device: str = option("auto", "Device to train on.", choices=DEVICES)
    precision: str = option("auto", "auto: bf16 where the hardware has it (CUDA; CPUs with AMX or AVX512-BF16), "
                            "else fp16 on CUDA, fp32 on CPU. Weights stay fp32 (autocast); on CPU under bf16 the "
                            "hidden states between layers are bf16 too.", choices=PRECISIONS)
    unpad: str = option("auto", "Drop padding before the encoder (flash varlen attention; no attention-probability "
                        "dropout on that path): auto = on CUDA sm80+ in bf16/fp16 for BERT models without attention "
                        "dropout, checked against the padded path at the start (else padded SDPA); on = anyway (CPU: "
                        "reference kernel).",
                        choices=("auto", "on", "off"))
    compile: bool = option(False, "torch.compile the encoder (CUDA; slower start, faster steps).")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to fit larger micro-batches.")
    loader_workers: int = option(-1, "Processes that mask and pad batches ahead while the device computes (torch "
                                 "DataLoader workers; 0 = in line); -1 = 2 on CUDA, 0 on CPU.")
    init_from_uer: Path | None = option(None, "Start from a UER-py checkpoint (model.bin-N) instead of the base weights.")
    max_time: str = option("", "Wall-clock budget (e.g. 23h, 90m): stop early with a checkpoint and export in time.")
    max_epochs: float = option(40.0, "Warn when --max-steps means more epochs than this over the corpus.")
    log_interval: int = option(50, "Log training loss and throughput every N steps.")
    replay_share: float = option(0.0, "Share of each global batch's sequences drawn from the --replay-corpus "
                                 "(e.g. 0.2); 0 = no replay. Its val loss is logged as replay_val_mlm_loss.")

    def problems(self) -> list[str]:
        found = _common_problems(self)
        if not (0.0 <= self.replay_share < 1.0):  # NaN fails too
            found.append(f"--replay-share {self.replay_share} must be in [0, 1)")
        for name in ("global_batch_size", "max_steps", "eval_interval", "save_interval",
                     "keep_checkpoints", "span_max", "eval_max_sequences"):
            if getattr(self, name) < 1:
                found.append(f"{_flag(name)} {getattr(self, name)} must be >= 1")
        micro = self.fixed_micro_batch_size
        if self.micro_batch_size != "auto" and (micro is None or micro < 1):
            found.append(f"--micro-batch-size {self.micro_batch_size!r} must be a positive integer or auto")
        elif micro is not None and self.global_batch_size % micro:
            found.append(f"--global-batch-size {self.global_batch_size} must be a multiple of "
                         f"--micro-batch-size {micro}")
        if parse_duration_s(self.max_time) is None:
            found.append(f"--max-time {self.max_time!r}: use a duration like 90m, 23h, 1d12h or seconds")
        if not self.max_epochs > 0:
            found.append(f"--max-epochs {self.max_epochs} must be > 0")
        for name, low, high in (("mask_prob", 0.0, 1.0), ("span_p", 0.0, 1.0), ("lr", 0.0, 1.0),
                                ("min_lr_ratio", -1e-12, 1.0), ("weight_decay", -1e-12, 10.0),
                                ("grad_clip", -1e-12, 1e6)):
            value = getattr(self, name)
            if not (low < value <= high):  # NaN fails every comparison, so it lands here too
                found.append(f"{_flag(name)} {value} must be in ({max(low, 0.0)}, {high}]")
        if self.head_warmup not in ("auto", "off") and not (self.head_warmup.isdigit() and
                                                             0 < int(self.head_warmup) < self.max_steps):
            found.append(f"--head-warmup {self.head_warmup!r} must be auto, off or a step count below "
                         f"--max-steps {self.max_steps}")
        if not (0.0 < self.head_warmup_lr <= 1.0):
            found.append(f"--head-warmup-lr {self.head_warmup_lr} must be in (0, 1]")
        if self.warmup_steps < -1:
            found.append(f"--warmup-steps {self.warmup_steps} must be >= 0 (or -1 for 1% of --max-steps)")
        if self.loader_workers < -1:
            found.append(f"--loader-workers {self.loader_workers} must be >= 0 (or -1: 2 on CUDA, 0 on CPU)")
        if self.init_from_uer is not None and not Path(self.init_from_uer).is_file():
            found.append(f"--init-from-uer {self.init_from_uer}: no such file")
        return found

    @property
    def fixed_micro_batch_size(self) -> int | None:
        """The micro-batch size when given as a number; None for auto (or garbage)."""
        try:
            return int(self.micro_batch_size)
        except (TypeError, ValueError):
            return None

    @property
    def max_time_s(self) -> float | None:
        return parse_duration_s(self.max_time) or None

    @property
    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else max(0, self.max_steps // 100)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """`cpt export`: a checkpoint -> RUN_DIR/model/, a Hugging Face dir that replaces the base model."""

    output: Path = option(None, "Run directory: every stage reads and writes under it.")
    base_model: Path = option(None, "Base model dir (Hugging Face format: config.json, vocab/tokenizer, weights).")
    checkpoint: str = option("best", "Which checkpoint: best, latest or step-N.")
    format: str = option("both", "Weights file(s): model.safetensors, pytorch_model.bin (the seed's name) or both.",
                         choices=EXPORT_FORMATS)
    into_base: bool = option(False, "Also put the new weights into --base-model, backing the originals up first.")

    def problems(self) -> list[str]:
        found = _common_problems(self)
        if self.checkpoint not in ("best", "latest") and not self.checkpoint.startswith("step-"):
            found.append(f"--checkpoint {self.checkpoint!r}: use best, latest or step-N")
        return found


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """`cpt plan`: the four stage configs, built from one set of options (a name two stages share, like
    --output, sets both)."""

    prepare: PrepareConfig
    tokenize: TokenizeConfig
    train: TrainConfig
    export: ExportConfig
    as_json: bool = option(False, "Print the plan as JSON.", flag="--json")

    def problems(self) -> list[str]:
        found: list[str] = []
        for stage in self.stages():
            found.extend(problem for problem in stage.problems() if problem not in found)  # --output once, not 4x
        return found + replay_problems(self.prepare, self.train)

    def stages(self) -> tuple[PrepareConfig, TokenizeConfig, TrainConfig, ExportConfig]:
        return self.prepare, self.tokenize, self.train, self.export

    def values(self) -> dict[str, Any]:
        """Every stage option by name, as the CLI gave them (what `stage_config` takes)."""
        values: dict[str, Any] = {}
        for stage in self.stages():
            for item in dataclasses.fields(stage):
                values.setdefault(item.name, getattr(stage, item.name))
        return values


@dataclass(frozen=True, kw_only=True)
class RunConfig(PlanConfig):
    """`cpt run`: prepare -> tokenize -> train -> export with the four stage configs (or only plan them)."""

    dry_run: bool = option(False, "Only plan: print what the run would cost (see `cpt plan`).", flag="--dry-run")


@dataclass(frozen=True, kw_only=True)
class InitBaseConfig:
    """`cpt init-base DIR`: a random BERT base model dir (for demos and tests)."""

    output_dir: Path = option(REQUIRED, "Directory to create (must not exist or be empty).", positional=True)
    preset: str = option("tiny", "Shape: tiny (2x64), small (4x256), base (12x768), large (24x1024).")
    seed: int = option(0, "Seed of the random weights.")

    def problems(self) -> list[str]:
        return _common_problems(self)  # the preset names live with their shapes (training/model.py PRESETS)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """`cpt demo`: the whole job on the embedded sample corpus and a tiny random base model."""

    output: Path = option(Path("demo-run"), "Run directory for the demo.")
    max_steps: int = option(300, "Training steps.")

    def problems(self) -> list[str]:
        found = _common_problems(self)
        if self.max_steps < 1:
            found.append(f"--max-steps {self.max_steps} must be >= 1")
        return found


CONVERT_DIRECTIONS = (("uer", "hf"), ("hf", "uer"))


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """`cpt convert SOURCE DESTINATION`: a UER-py checkpoint <-> a Hugging Face BERT dir."""

    error: ClassVar[type[CptError]] = UsageError  # a wrong flag combination is a usage error (exit 2)

    source: Path = option(REQUIRED, "UER-py checkpoint file (--from uer) or HF model dir (--from hf).", positional=True)
    destination: Path = option(REQUIRED, "New HF model dir (--to hf) or UER-py file (--to uer).", positional=True)
    from_format: str = option("uer", "Format of SOURCE: uer or hf.", flag="--from")
    to_format: str = option("hf", "Format of DESTINATION: hf or uer.", flag="--to")
    base_model: Path | None = option(None, "Base HF model dir: config, tokenizer and the keys UER lacks (--from uer).")
    target: str = option("auto", "UER target: auto (uer->hf), mlm or bert (adds target.sp.*).")

    def problems(self) -> list[str]:
        if (self.from_format, self.to_format) not in CONVERT_DIRECTIONS:
            return [f"--from {self.from_format} --to {self.to_format}: use --from uer --to hf or --from hf --to uer"]
        if self.from_format == "uer" and self.base_model is None:
            return ["--from uer needs --base-model DIR (its config, tokenizer and pooler/NSP weights)"]
        return _common_problems(self)  # --target is checked by the converter: its choices depend on the direction


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """`cpt eval`: what is measured and on which text; the defaults match `cpt train`'s masking."""

    model: tuple[Path, ...] = option((), "Model dir (Hugging Face); repeat to compare.", required=True)
    corpus: tuple[str, ...] = option(REQUIRED, "Held-out text: file, directory or glob (as prepare).")
    max_seq_length: int = option(128, "Tokens per sequence including [CLS] and [SEP].")
    max_sequences: int = option(1000, "Score the first N sequences of the corpus.")
    seed: int = option(42, "Seed of the fixed masks (a run's seed reproduces its val numbers).")
    masking: str = option("wwm+span", "Masking mode, as in training.", choices=MASKING_MODES)
    mask_prob: float = option(0.15, "Share of each sequence's tokens to predict.")
    pppl_tokens: int = option(2048, "Tokens scored one at a time for pseudo-perplexity; 0 skips.")
    batch_size: int = option(32, "Sequences (or pseudo-perplexity rows) per forward pass.")
    text_column: str = option("", "Text column of .csv/.tsv files (name or 0-based index).")
    device: str = option("auto", "Device to score on.", choices=DEVICES)
    as_json: bool = option(False, "Print JSON instead of a table.", flag="--json")
    span_p: float = 0.2
    """Span length ~ geometric(p), as in training (no flag: eval masks like a default run)."""
    span_max: int = 10
    """Longest span in words (no flag, as span_p)."""

    def problems(self) -> list[str]:
        found = _common_problems(self)
        if not self.corpus:
            found.append("--corpus is required: the held-out text to score")
        if self.max_seq_length < 8:
            found.append(f"--max-seq-length {self.max_seq_length} must be >= 8")
        for name in ("max_sequences", "batch_size", "span_max"):
            if getattr(self, name) < 1:
                found.append(f"{_flag(name)} {getattr(self, name)} must be >= 1")
        if self.pppl_tokens < 0:
            found.append(f"--pppl-tokens {self.pppl_tokens} must be >= 0 (0 skips pseudo-perplexity)")
        if not 0.0 < self.mask_prob <= 1.0:
            found.append(f"--mask-prob {self.mask_prob} must be in (0, 1]")
        return found


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """`cpt probe`: one fine-tuning recipe applied to every model."""

    model: tuple[Path, ...] = option((), "Model dir (Hugging Face); repeat to compare.", required=True)
    train: Path = option(REQUIRED, "Labelled training examples: .tsv/.csv (label<TAB>text) or .jsonl.")
    test: Path = option(REQUIRED, "Labelled test examples, same format and labels.")
    text_column: str = option("", "Text column: header name or 0-based index (default: last).")
    label_column: str = option("", "Label column: header name or 0-based index (default: 0).")
    steps: int = option(200, "Fine-tuning steps (batches) per model.")
    batch_size: int = option(16, "Examples per step.")
    lr: float = option(5e-5, "Peak learning rate (10% warmup, linear decay).")
    max_seq_length: int = option(128, "Truncate examples to this many tokens.")
    max_train_examples: int = option(0, "Use the first N training examples; 0 = all.")
    max_test_examples: int = option(0, "Use the first N test examples; 0 = all.")
    seed: int = option(42, "Seed of the head, batches and dropout (the same for every model).")
    device: str = option("auto", "Device to fine-tune on.", choices=DEVICES)
    as_json: bool = option(False, "Print JSON instead of a table.", flag="--json")
    weight_decay: float = 0.01
    """AdamW weight decay of the fine-tuning (no flag)."""

    def problems(self) -> list[str]:
        found = _common_problems(self)
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                found.append(f"{_flag(name)} {getattr(self, name)} must be >= 1")
        if self.max_seq_length < 8:
            found.append(f"--max-seq-length {self.max_seq_length} must be >= 8")
        if not 0.0 < self.lr <= 1.0:
            found.append(f"--lr {self.lr} must be in (0, 1]")
        for name in ("max_train_examples", "max_test_examples"):
            if getattr(self, name) < 0:
                found.append(f"{_flag(name)} {getattr(self, name)} must be >= 0 (0 = all)")
        return found


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """`cpt report RUN_DIR`: rewrite a run's report.md and curves.png."""

    run_dir: Path = option(REQUIRED, "A run directory (the --output of cpt run/train).", positional=True)

    def problems(self) -> list[str]:
        return _common_problems(self)


def json_values(config: Any) -> dict[str, Any]:
    """A config's fields as JSON values (paths as str, tuples as lists): what checkpoints and reports record."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        return [plain(item) for item in value] if isinstance(value, tuple) else value

    return {item.name: plain(getattr(config, item.name)) for item in dataclasses.fields(config)}


def parse_duration_s(text: str) -> float | None:
    """Seconds in '23h', '90m', '1d12h', '45s' or '3600'; 0 for ''; None when malformed."""
    text = str(text).strip().lower()
    if not text:
        return 0.0
    try:
        return float(text) if float(text) >= 0 else None
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)


STAGE_CONFIGS = (PrepareConfig, TokenizeConfig, TrainConfig, ExportConfig)  # the ones that read CPT_* env vars


def env_name(owner: type, name: str) -> str | None:
    """The env var that sets option `name` of config `owner`: CPT_NAME for the stage configs, else none."""
    return "CPT_" + name.upper() if owner in STAGE_CONFIGS else None


@functools.cache
def field_types(config_class: type) -> dict[str, Any]:
    """Field name -> its resolved type (the annotations are strings here)."""
    return typing.get_type_hints(config_class)


def option_fields(config_class: type) -> list[tuple[type, dataclasses.Field]]:
    """(owner config, field) of every CLI option of `config_class`: a field that holds a config contributes
    that config's options; a name seen before is left out (one --output for all stages)."""
    found: dict[str, tuple[type, dataclasses.Field]] = {}
    for item in dataclasses.fields(config_class):
        kind = field_types(config_class)[item.name]
        if dataclasses.is_dataclass(kind):
            for owner, inner in option_fields(kind):
                found.setdefault(inner.name, (owner, inner))
        elif "help" in item.metadata:
            found.setdefault(item.name, (config_class, item))
    return list(found.values())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _common_problems(config: Any) -> list[str]:
    """Unknown choices, and options that have no value although their type is not optional."""
    found = []
    types = field_types(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        choices = item.metadata.get("choices")
        if choices and value not in choices:
            found.append(f"{_flag(item.name)} {value!r} is unknown; use one of: {', '.join(choices)}")
        if value is None and not is_optional(types[item.name]):
            env = env_name(type(config), item.name)
            found.append(f"{_flag(item.name)}{f' / {env}' if env else ''} is required")
    return found


def replay_problems(prepare: PrepareConfig, train: TrainConfig) -> list[str]:
    """`cpt run` / `cpt plan`: a replay corpus and a replay share come together."""
    if train.replay_share > 0 and not prepare.replay_corpus:
        return [f"--replay-share {train.replay_share} needs --replay-corpus / CPT_REPLAY_CORPUS: the general text to replay"]
    if prepare.replay_corpus and not train.replay_share > 0:
        return ["--replay-corpus is given but --replay-share is 0; set --replay-share (e.g. 0.2) or drop --replay-corpus"]
    return []


def check(config: Any) -> Any:
    """Return the config unchanged, or raise its error (BadInput unless it says otherwise) naming every
    invalid setting at once."""
    found = config.problems()
    if found:
        raise getattr(config, "error", BadInput)("; ".join(found))
    return config


def stage_config(config_class: type, values: dict[str, Any]) -> Any:
    """Build a config from a dict of option values that may hold other commands' options too; a field that
    holds a config is built from the same dict; lists (as the CLI gives them) become tuples."""
    kwargs = {}
    for item in dataclasses.fields(config_class):
        kind = field_types(config_class)[item.name]
        if dataclasses.is_dataclass(kind):
            kwargs[item.name] = stage_config(kind, values)
        elif item.name in values:
            value = values[item.name]
            kwargs[item.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**kwargs)
