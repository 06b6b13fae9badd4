"""`cpt eval`, `cpt probe` and `cpt report`: commands that look at models and runs (registered on the main app).

    cpt eval   --model BASE --model RUN/model --corpus held_out.txt [--json]
    cpt probe  --model BASE --model RUN/model --train train.tsv --test test.tsv [--json]
    cpt report RUN_DIR

Tables go to stdout (or JSON with --json), progress to stderr. Errors are one line and an exit code
(3 for a missing model dir, corpus or label column), as for every cpt command.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer


def _stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def _print_json(report: dict) -> None:
    # NaN is not JSON: null reads everywhere.
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        return value

    print(json.dumps(clean(report), ensure_ascii=False, indent=2))


def _value(number: float | None, digits: int) -> str:
    return "–" if number is None or math.isnan(number) else f"{number:.{digits}f}"


def models_table(title: str, columns: list[tuple[str, str, int]], models: list[dict], caption: str):
    """A rich table with one row per model; columns are (header, result key, decimals)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("model")
    for header, _key, _digits in columns:
        table.add_column(header, justify="right")
    for result in models:
        table.add_row(result["model"], *(_value(result.get(key), digits) for _header, key, digits in columns))
    return table


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


def probe_table(report: dict):
    settings, data = report["settings"], report["data"]
    caption = (f"{data['train_examples']} train / {data['test_examples']} test examples, "
               f"{len(data['classes'])} classes (majority-class accuracy {data['majority_accuracy']:.4f}); "
               f"{settings['steps']} steps x {settings['batch_size']}, lr {settings['lr']:g}, seed {settings['seed']}")
    columns = [("accuracy", "accuracy", 4), ("macro-F1", "macro_f1", 4), ("final train loss", "final_train_loss", 4)]
    return models_table("Probe: fine-tuned sequence classifier", columns, report["models"], caption)


def register(app, guarded) -> None:
    """Add the evaluation commands to the typer `app`; `guarded(action)` maps CptError to exit codes."""

    @app.command("eval")
    def eval_command(
        model: Annotated[list[Path], typer.Option("--model", help="Model dir (Hugging Face); repeat to compare.")],
        corpus: Annotated[list[str], typer.Option("--corpus", help="Held-out text: file, directory or glob (as prepare).")],
        max_seq_length: Annotated[int, typer.Option(help="Tokens per sequence including [CLS] and [SEP].")] = 128,
        max_sequences: Annotated[int, typer.Option(help="Score the first N sequences of the corpus.")] = 1000,
        seed: Annotated[int, typer.Option(help="Seed of the fixed masks (a run's seed reproduces its val numbers).")] = 42,
        masking: Annotated[str, typer.Option(help="Masking mode, as in training: wwm+span|wwm|span|token.")] = "wwm+span",
        mask_prob: Annotated[float, typer.Option(help="Share of each sequence's tokens to predict.")] = 0.15,
        pppl_tokens: Annotated[int, typer.Option(help="Tokens scored one at a time for pseudo-perplexity; 0 skips.")] = 2048,
        batch_size: Annotated[int, typer.Option(help="Sequences (or pseudo-perplexity rows) per forward pass.")] = 32,
        text_column: Annotated[str, typer.Option(help="Text column of .csv/.tsv files (name or 0-based index).")] = "",
        device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
        json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """MLM loss, accuracy (fixed seeded masks) and pseudo-perplexity of models on held-out text, side by side."""
        from cpt.tools.eval import EvalSettings, evaluate_models

        def action() -> None:
            settings = EvalSettings(corpus=tuple(corpus), max_seq_length=max_seq_length, max_sequences=max_sequences,
                                    seed=seed, masking=masking, mask_prob=mask_prob, pppl_tokens=pppl_tokens,
                                    batch_size=batch_size, text_column=text_column, device=device)
            report = evaluate_models(list(model), settings)
            if json_output:
                _print_json(report)
            else:
                _stdout_console().print(eval_table(report))

        guarded(action)

    @app.command("probe")
    def probe_command(
        model: Annotated[list[Path], typer.Option("--model", help="Model dir (Hugging Face); repeat to compare.")],
        train: Annotated[Path, typer.Option("--train", help="Labelled training examples: .tsv/.csv (label<TAB>text) or .jsonl.")],
        test: Annotated[Path, typer.Option("--test", help="Labelled test examples, same format and labels.")],
        text_column: Annotated[str, typer.Option(help="Text column: header name or 0-based index (default: last).")] = "",
        label_column: Annotated[str, typer.Option(help="Label column: header name or 0-based index (default: 0).")] = "",
        steps: Annotated[int, typer.Option(help="Fine-tuning steps (batches) per model.")] = 200,
        batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
        lr: Annotated[float, typer.Option(help="Peak learning rate (10% warmup, linear decay).")] = 5e-5,
        max_seq_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 128,
        max_train_examples: Annotated[int, typer.Option(help="Use the first N training examples; 0 = all.")] = 0,
        max_test_examples: Annotated[int, typer.Option(help="Use the first N test examples; 0 = all.")] = 0,
        seed: Annotated[int, typer.Option(help="Seed of the head, batches and dropout (the same for every model).")] = 42,
        device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
        json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Fine-tune each model as a classifier for a few steps; accuracy and macro-F1 side by side."""
        from cpt.tools.probe import ProbeSettings, probe_models

        def action() -> None:
            settings = ProbeSettings(train=train, test=test, text_column=text_column, label_column=label_column,
                                     steps=steps, batch_size=batch_size, lr=lr, max_seq_length=max_seq_length,
                                     max_train_examples=max_train_examples, max_test_examples=max_test_examples,
                                     seed=seed, device=device)
            report = probe_models(list(model), settings)
            if json_output:
                _print_json(report)
            else:
                _stdout_console().print(probe_table(report))

        guarded(action)

    @app.command("report")
    def report_command(
        run_dir: Annotated[Path, typer.Argument(help="A run directory (the --output of cpt run/train).")],
    ) -> None:
        """(Re)write RUN_DIR/report.md and RUN_DIR/curves.png from the run's manifests and metrics."""
        from cpt.common.runtime import info
        from cpt.tools.report import CURVES_NAME, write_report

        def action() -> None:
            path = write_report(run_dir)
            info(f"report: {path} and {path.with_name(CURVES_NAME)}")

        guarded(action)
