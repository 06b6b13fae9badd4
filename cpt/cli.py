"""The `cpt` command: a thin typer shell over a table of commands, one per stage plus `run` and tools.

    cpt prepare  --corpus PATH... --output RUN_DIR
    cpt tokenize --output RUN_DIR --base-model DIR
    cpt train    --output RUN_DIR --base-model DIR
    cpt export   --output RUN_DIR --base-model DIR
    cpt run      --corpus PATH... --base-model DIR --output RUN_DIR   (all four, idempotent)

Each command is a row of COMMANDS: its name, help, config class (config.py) and stage function.
Its options are generated from the config's fields (the stage configs' also read `CPT_<OPTION>`
from the environment when the flag is absent); the command builds the config, checks it and
calls the stage. Errors become one line on stderr and an exit code from `errors.py`;
CPT_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from cpt import config as cfg
from cpt.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_USAGE, CptError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: type
    stage: str  # "module:function" taking the checked config; imported on use, so `cpt --help` loads no torch


COMMANDS = (
    Command("prepare", "Clean, deduplicate and split the corpus into RUN_DIR/corpus/{train,val}.txt "
            "(--replay-corpus: RUN_DIR/replay/).", cfg.PrepareConfig, "cpt.pipeline:prepare_stage"),
    Command("tokenize", "Tokenize the prepared corpus (and replay corpus) with the base model's tokenizer and jieba "
            "word boundaries.", cfg.TokenizeConfig, "cpt.pipeline:tokenize_stage"),
    Command("train", "Continue MLM pretraining from the base model on the shards; checkpoints and picks the best.",
            cfg.TrainConfig, "cpt.pipeline:train_stage"),
    Command("export", "Write RUN_DIR/model/: a Hugging Face dir with every key of the base, ready to replace it.",
            cfg.ExportConfig, "cpt.export.export:export_model"),
    Command("run", "prepare -> tokenize -> train -> export; a rerun skips finished stages and resumes training.",
            cfg.RunConfig, "cpt.pipeline:run_stage"),
    Command("plan", "Corpus size, epochs, wall time (from a few timed real steps), disk and memory, before a run.",
            cfg.PlanConfig, "cpt.pipeline:plan_stage"),
    Command("init-base", "Create a random BERT base model dir laid out like the real checkpoint (for demos and tests).",
            cfg.InitBaseConfig, "cpt.pipeline:init_base_stage"),
    Command("demo", "The whole job on the embedded sample corpus and a tiny random base model (about 2 minutes on 2 "
            "cores).", cfg.DemoConfig, "cpt.pipeline:run_demo"),
    Command("convert", "Convert checkpoints between UER-py and Hugging Face BERT layouts (layer count read from the "
            "weights).", cfg.ConvertConfig, "cpt.pipeline:convert_stage"),
    Command("eval", "MLM loss, accuracy (fixed seeded masks) and pseudo-perplexity of models on held-out text, side "
            "by side.", cfg.EvalConfig, "cpt.tools.eval:evaluate_and_print"),
    Command("probe", "Fine-tune each model as a classifier for a few steps; accuracy and macro-F1 side by side.",
            cfg.ProbeConfig, "cpt.tools.probe:probe_and_print"),
    Command("report", "(Re)write RUN_DIR/report.md and RUN_DIR/curves.png from the run's manifests and metrics.",
            cfg.ReportConfig, "cpt.pipeline:report_stage"),
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Continued masked-LM pretraining of Chinese BERTs: corpus + base model in, adapted HF model out.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _parameter(owner: type, item: dataclasses.Field) -> inspect.Parameter:
    """The typer parameter of one config field: its type, flag, env var, help and default."""
    kind = cfg.field_types(owner)[item.name]
    if typing.get_origin(kind) is tuple:  # tuple[X, ...]: a repeatable option
        kind = list[typing.get_args(kind)[0]]
    elif cfg.is_optional(kind):
        kind = typing.Optional[next(arg for arg in typing.get_args(kind) if arg is not type(None))]  # noqa: UP045
    help_text = item.metadata["help"]
    if item.metadata["choices"]:  # in parentheses: rich would take [a|b] for markup and drop it
        help_text += f" ({'|'.join(item.metadata['choices'])})"
    if item.metadata["positional"]:
        declaration = typer.Argument(help=help_text)
    else:
        flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
        if kind is bool and not item.metadata["flag"]:
            flag = f"{flag}/--no-{flag[2:]}"
        declaration = typer.Option(flag, envvar=cfg.env_name(owner, item.name), help=help_text)
    if item.metadata["required"]:
        default: Any = inspect.Parameter.empty
    elif item.default_factory is not dataclasses.MISSING:
        default = list(item.default_factory())  # a tuple default, shown as typer's list
    else:
        default = item.default
    return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, declaration])


def _register(command: Command) -> None:
    """Add `command` to the app: options from its config; the body builds, checks and runs the stage."""

    def body(**values: Any) -> None:
        module, function = command.stage.split(":")
        _guarded(lambda: getattr(importlib.import_module(module), function)(
            cfg.check(cfg.stage_config(command.config, values))))

    parameters = [_parameter(owner, item) for owner, item in cfg.option_fields(command.config)]
    body.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    body.__name__ = command.name.replace("-", "_")
    app.command(command.name, help=command.help)(body)


for _command in COMMANDS:
    _register(_command)


def env_vars() -> list[str]:
    """Every CPT_* variable the CLI reads (besides CPT_DEBUG), sorted."""
    return sorted({name for command in COMMANDS for owner, item in cfg.option_fields(command.config)
                   if (name := cfg.env_name(owner, item.name))})


RENAMED_ENV_VARS = {"CPT_LOADER_THREADS": "CPT_LOADER_WORKERS"}  # old name: new name


def warn_about_renamed_env_vars(environ=os.environ) -> list[str]:
    """A variable under its old name would be silently ignored: say so (as every warning: once, on stderr)."""
    from cpt.common.runtime import warn

    messages = [f"{old} is no longer read; set {new} instead"
                for old, new in RENAMED_ENV_VARS.items() if old in environ and new not in environ]
    for message in messages:
        warn(message)
    return messages


# --- errors -> exit codes: what a stage raises (_guarded), what typer raises around it (_main) --------------

def _guarded(action: Callable[[], None]) -> None:
    """Run a command; map CptError to its one-line message and exit code."""
    from cpt.common.runtime import console_error

    try:
        action()
    except CptError as error:
        if os.environ.get("CPT_DEBUG") == "1":
            raise
        console_error(error.message)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        console_error("interrupted")
        raise typer.Exit(130) from None
    except OSError as error:
        import errno

        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("CPT_DEBUG") == "1":
            raise
        where = f" writing {error.filename}" if error.filename else ""
        console_error(f"no space left on the device{where}; free space there (or lower --keep-checkpoints) and "
                      "rerun the same command: it resumes from the last checkpoint")
        raise typer.Exit(EXIT_BAD_INPUT) from None


def main() -> None:
    """The `cpt` command. Under torchrun a worker leaves through runtime.leave_process once its work is
    done (files written, process group destroyed): see there for the shutdown abort it avoids."""
    from cpt.common.runtime import leave_process, world_size

    try:
        _main()
    except SystemExit as leaving:
        if world_size() > 1:
            if isinstance(leaving.code, str):  # what SystemExit would have printed
                print(leaving.code, file=sys.stderr)
            leave_process(leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1))
        raise


def _main() -> None:
    warn_about_renamed_env_vars()
    try:
        code = app(standalone_mode=False)  # click errors come back to us instead of being printed as a box
    except typer.exceptions.TyperException as error:  # typer's (vendored) click: usage errors and friends
        if type(error).__name__ == "NoArgsIsHelpError":  # plain `cpt`: show the help as before
            error.show()
            sys.exit(error.exit_code)
        context = getattr(error, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        print(f"cpt: error: {' '.join(error.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        print("cpt: error: aborted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception:
        if os.environ.get("CPT_DEBUG") == "1":
            raise
        import traceback

        last = traceback.format_exc().strip().splitlines()[-1]
        print(f"cpt: unexpected error: {last} (rerun with CPT_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(EXIT_CRASH)
    sys.exit(code or 0)


__all__ = ["COMMANDS", "app", "env_vars", "main", "EXIT_USAGE"]
