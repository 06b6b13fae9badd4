"""The `cpt` command: a thin typer shell, one command per stage plus `run`.

    cpt prepare  --corpus PATH... --output RUN_DIR
    cpt tokenize --output RUN_DIR --base-model DIR
    cpt train    --output RUN_DIR --base-model DIR
    cpt export   --output RUN_DIR --base-model DIR
    cpt run      --corpus PATH... --base-model DIR --output RUN_DIR   (all four, idempotent)

Options are generated from the stage configs in `config.py`; each reads `CPT_<OPTION>` from the
environment when the flag is absent. Errors become one line on stderr and an exit code from
`errors.py`; CPT_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cpt import config as cfg
from cpt.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_USAGE, CptError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Continued masked-LM pretraining of Chinese BERTs: corpus + base model in, adapted HF model out.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _env_name(field_name: str) -> str:
    return "CPT_" + field_name.upper()


def _option_annotation(item: dataclasses.Field) -> Any:
    """`Annotated[type, typer.Option(...)]` for one config field."""
    hints = typing.get_type_hints(_owner_of(item))
    kind = hints[item.name]
    help_text = item.metadata["help"]
    if item.metadata.get("choices"):
        help_text += f" [{'|'.join(item.metadata['choices'])}]"
    flag = "--" + item.name.replace("_", "-")
    if kind is bool:
        return Annotated[bool, typer.Option(f"{flag}/--no-{flag[2:]}", envvar=_env_name(item.name), help=help_text)]
    if typing.get_origin(kind) is tuple:
        return Annotated[list[str], typer.Option(flag, envvar=_env_name(item.name), help=help_text)]
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        return Annotated[typing.Optional[kind], typer.Option(flag, envvar=_env_name(item.name), help=help_text)]  # noqa: UP045
    return Annotated[kind, typer.Option(flag, envvar=_env_name(item.name), help=help_text)]


_FIELD_OWNERS: dict[int, type] = {}


def _owner_of(item: dataclasses.Field) -> type:
    return _FIELD_OWNERS[id(item)]


for _config_class in cfg.STAGE_CONFIGS:
    for _item in dataclasses.fields(_config_class):
        _FIELD_OWNERS[id(_item)] = _config_class


def _fields(*config_classes: type) -> list[dataclasses.Field]:
    """Fields of several configs, first occurrence of each name wins."""
    seen: dict[str, dataclasses.Field] = {}
    for config_class in config_classes:
        for item in dataclasses.fields(config_class):
            seen.setdefault(item.name, item)
    return list(seen.values())


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    value = item.default_factory()  # type: ignore[misc]
    return list(value) if isinstance(value, tuple) else value


def stage_command(name: str, *config_classes: type, extra: dict[str, tuple[Any, Any]] | None = None):
    """Register `body(values: dict)` as command `name` whose options are the configs' fields."""
    extra = extra or {}

    def register(body: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
        parameters = []
        annotations: dict[str, Any] = {}
        for item in _fields(*config_classes):
            annotation = _option_annotation(item)
            parameters.append(
                inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=_default(item),
                                  annotation=annotation))
            annotations[item.name] = annotation
        for extra_name, (annotation, default) in extra.items():
            parameters.append(inspect.Parameter(extra_name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=annotation))
            annotations[extra_name] = annotation

        def command(**values: Any) -> None:
            for key, value in values.items():
                if isinstance(value, list):
                    values[key] = tuple(value)
            _guarded(lambda: body(values))

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = annotations
        command.__doc__ = body.__doc__
        command.__name__ = name.replace("-", "_")
        app.command(name)(command)
        return command

    return register


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


@stage_command("prepare", cfg.PrepareConfig)
def prepare_command(values: dict[str, Any]) -> None:
    """Clean, deduplicate and split the corpus into RUN_DIR/corpus/{train,val}.txt (--replay-corpus: RUN_DIR/replay/)."""
    from cpt.data.prepare import prepare_corpus
    from cpt.data.replay import check_replay_corpus, prepare_replay

    config = cfg.check(cfg.stage_config(cfg.PrepareConfig, values))
    if config.replay_corpus:
        check_replay_corpus(config)
    prepare_corpus(config)
    if config.replay_corpus:
        prepare_replay(config)


@stage_command("tokenize", cfg.TokenizeConfig)
def tokenize_command(values: dict[str, Any]) -> None:
    """Tokenize the prepared corpus (and replay corpus) with the base model's tokenizer and jieba word boundaries."""
    from cpt.data.replay import is_prepared, tokenize_replay
    from cpt.data.tokenization import tokenize_corpus

    config = cfg.check(cfg.stage_config(cfg.TokenizeConfig, values))
    tokenize_corpus(config)
    if is_prepared(config.output):
        tokenize_replay(config)


@stage_command("train", cfg.TrainConfig)
def train_command(values: dict[str, Any]) -> None:
    """Continue MLM pretraining from the base model on the shards; checkpoints and picks the best."""
    from cpt.training.loop import train

    train(cfg.check(cfg.stage_config(cfg.TrainConfig, values)))


@stage_command("export", cfg.ExportConfig)
def export_command(values: dict[str, Any]) -> None:
    """Write RUN_DIR/model/: a Hugging Face dir with every key of the base, ready to replace it."""
    from cpt.export.export import export_model

    export_model(cfg.check(cfg.stage_config(cfg.ExportConfig, values)))


DRY_RUN = Annotated[bool, typer.Option("--dry-run", help="Only plan: print what the run would cost (see `cpt plan`).")]
AS_JSON = Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")]


@stage_command("run", *cfg.STAGE_CONFIGS, extra={"dry_run": (DRY_RUN, False), "as_json": (AS_JSON, False)})
def run_command(values: dict[str, Any]) -> None:
    """prepare -> tokenize -> train -> export; a rerun skips finished stages and resumes training."""
    if values.pop("dry_run"):
        from cpt.tools.plan import plan_run

        plan_run(values, as_json=values.pop("as_json"))
        return
    from cpt.pipeline import run_pipeline

    run_pipeline(values)


@stage_command("plan", *cfg.STAGE_CONFIGS, extra={"as_json": (AS_JSON, False)})
def plan_command(values: dict[str, Any]) -> None:
    """Corpus size, epochs, wall time (from a few timed real steps), disk and memory, before a run."""
    from cpt.tools.plan import plan_run

    plan_run(values, as_json=values.pop("as_json"))


@app.command("init-base")
def init_base_command(
    output_dir: Annotated[Path, typer.Argument(help="Directory to create (must not exist or be empty).")],
    preset: Annotated[str, typer.Option(help="Shape: tiny (2x64), small (4x256), base (12x768), large (24x1024).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Create a random BERT base model dir laid out like the real checkpoint (for demos and tests)."""
    from cpt.training.model import init_base

    _guarded(lambda: init_base(output_dir, preset=preset, seed=seed))


@app.command("demo")
def demo_command(
    output: Annotated[Path, typer.Option(help="Run directory for the demo.")] = Path("demo-run"),
    max_steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
) -> None:
    """The whole job on the embedded sample corpus and a tiny random base model (about 2 minutes on 2 cores)."""
    from cpt.pipeline import run_demo

    _guarded(lambda: run_demo(output, max_steps=max_steps))


@app.command("convert")
def convert_command(
    source: Annotated[Path, typer.Argument(help="UER-py checkpoint file (--from uer) or HF model dir (--from hf).")],
    destination: Annotated[Path, typer.Argument(help="New HF model dir (--to hf) or UER-py file (--to uer).")],
    from_format: Annotated[str, typer.Option("--from", help="Format of SOURCE: uer or hf.")] = "uer",
    to_format: Annotated[str, typer.Option("--to", help="Format of DESTINATION: hf or uer.")] = "hf",
    base_model: Annotated[
        typing.Optional[Path],  # noqa: UP045
        typer.Option(help="Base HF model dir: config, tokenizer and the keys UER lacks (--from uer)."),
    ] = None,
    target: Annotated[str, typer.Option(help="UER target: auto (uer->hf), mlm or bert (adds target.sp.*).")] = "auto",
) -> None:
    """Convert checkpoints between UER-py and Hugging Face BERT layouts (layer count read from the weights)."""
    from cpt.common.runtime import info
    from cpt.errors import UsageError
    from cpt.export.convert import hf_to_uer, uer_to_hf

    def action() -> None:
        if (from_format, to_format) == ("uer", "hf"):
            if base_model is None:
                raise UsageError("--from uer needs --base-model DIR (its config, tokenizer and pooler/NSP weights)")
            report = uer_to_hf(source, base_model, destination, target=target)
        elif (from_format, to_format) == ("hf", "uer"):
            report = hf_to_uer(source, destination, target="mlm" if target == "auto" else target)
        else:
            raise UsageError(f"--from {from_format} --to {to_format}: use --from uer --to hf or --from hf --to uer")
        info(f"convert: {report.layers} layers -> {report.written}")
        if report.keys_from_base:
            info(f"  {len(report.keys_from_base)} keys from the base model: {', '.join(report.keys_from_base[:4])}")
        if report.keys_left_out:
            info(f"  {len(report.keys_left_out)} keys left out: {', '.join(report.keys_left_out[:4])}")

    _guarded(action)


def _register_more_commands() -> None:
    from cpt import cli_eval

    cli_eval.register(app, _guarded)


_register_more_commands()


def env_vars() -> list[str]:
    """Every CPT_* variable the CLI reads (besides CPT_DEBUG), sorted."""
    return sorted({_env_name(item.name) for item in _fields(*cfg.STAGE_CONFIGS)})


RENAMED_ENV_VARS = {"CPT_LOADER_THREADS": "CPT_LOADER_WORKERS"}  # old name: new name


def warn_about_renamed_env_vars(environ=os.environ) -> list[str]:
    """A variable under its old name would be silently ignored: say so (as every warning: once, on stderr)."""
    from cpt.common.runtime import warn

    messages = [f"{old} is no longer read; set {new} instead"
                for old, new in RENAMED_ENV_VARS.items() if old in environ and new not in environ]
    for message in messages:
        warn(message)
    return messages


def main() -> None:
    """The `cpt` command. Under torchrun a worker leaves through os._exit once its work is done (files
    written, process group destroyed): at interpreter shutdown a C++ thread of torch.distributed was seen
    to abort the process now and then ("terminate called without an active exception", exit 134 instead
    of 0 or 4: twice in CI, after checkpoint and metrics were on disk), which turned a clean stop into a
    crash that the cluster retries."""
    try:
        _main()
    except SystemExit as leaving:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if isinstance(leaving.code, str):  # what SystemExit would have printed
                print(leaving.code, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1))
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


__all__ = ["app", "env_vars", "main", "EXIT_USAGE"]
