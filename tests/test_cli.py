"""The CLI as users drive it: env vars, flag precedence, idempotent reruns, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import cpt_command

from cpt.cli import env_vars

pytestmark = pytest.mark.slow


def run_cpt(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*cpt_command(), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def fast_env(tmp_path, tiny_base, small_corpus) -> dict[str, str]:
    return {
        "CPT_CORPUS": str(small_corpus), "CPT_BASE_MODEL": str(tiny_base), "CPT_OUTPUT": str(tmp_path / "run"),
        "CPT_MAX_SEQ_LENGTH": "64", "CPT_MICRO_BATCH_SIZE": "4", "CPT_GLOBAL_BATCH_SIZE": "8", "CPT_MAX_STEPS": "2",
        "CPT_EVAL_INTERVAL": "2", "CPT_SAVE_INTERVAL": "2", "CPT_EVAL_MAX_SEQUENCES": "8", "CPT_WORKERS": "1",
        "CPT_VAL_FRACTION": "0.1",
    }


def test_run_from_env_vars_then_rerun_is_idempotent_and_flag_wins(tmp_path, tiny_base, small_corpus):
    env = fast_env(tmp_path, tiny_base, small_corpus)
    first = run_cpt("run", env=env)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "run"
    assert (run_dir / "model" / "model.safetensors").exists()
    assert (run_dir / "model" / "pytorch_model.bin").exists()
    assert "val_mlm_acc" in first.stderr and str(run_dir / "model") in first.stderr
    exported = (run_dir / "model" / "model.safetensors").stat().st_mtime_ns

    again = run_cpt("run", env=env)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
    assert (run_dir / "model" / "model.safetensors").stat().st_mtime_ns == exported

    longer = run_cpt("run", "--max-steps", "4", "--save-interval", "4", env=env)  # flag beats CPT_MAX_STEPS=2
    assert longer.returncode == 0, longer.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and "resumed from" in longer.stderr


@pytest.mark.parametrize(
    ("args", "env_changes", "fragment"),
    [
        (["--base-model", "/nonexistent/base"], {}, "/nonexistent/base"),
        (["--masking", "bogus"], {}, "--masking"),
        ([], {"CPT_MICRO_BATCH_SIZE": "3"}, "--global-batch-size"),
        (["--corpus", "/nonexistent/corpus.txt"], {}, "/nonexistent/corpus.txt"),
        (["--max-seq-length", "4096"], {}, "max_position_embeddings"),
        (["--lr", "nan"], {}, "--lr"),
        (["--max-steps", "-5"], {}, "--max-steps"),
    ],
)
def test_bad_input_exits_3_with_one_line(tmp_path, tiny_base, small_corpus, args, env_changes, fragment):
    env = {**fast_env(tmp_path, tiny_base, small_corpus), **env_changes}
    corpus_before = small_corpus.read_bytes()
    result = run_cpt("run", *args, env=env)
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("cpt: error:") and fragment in lines[-1]
    assert "Traceback" not in result.stderr
    assert small_corpus.read_bytes() == corpus_before


def test_usage_errors_exit_2(tmp_path, tiny_base, small_corpus):
    env = fast_env(tmp_path, tiny_base, small_corpus)
    assert run_cpt("run", "--max-steps", "many", env=env).returncode == 2
    assert run_cpt("run", "--no-such-flag", env=env).returncode == 2
    assert run_cpt("run", env={**env, "CPT_MAX_STEPS": "many"}).returncode == 2


def test_debug_shows_traceback(tmp_path, tiny_base, small_corpus):
    env = {**fast_env(tmp_path, tiny_base, small_corpus), "CPT_DEBUG": "1", "CPT_CORPUS": "/nonexistent"}
    result = run_cpt("prepare", env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_env_vars_cover_every_option():
    names = env_vars()
    for expected in ("CPT_CORPUS", "CPT_BASE_MODEL", "CPT_OUTPUT", "CPT_MAX_STEPS", "CPT_MICRO_BATCH_SIZE",
                     "CPT_GLOBAL_BATCH_SIZE", "CPT_MASKING", "CPT_RESUME", "CPT_FORMAT", "CPT_INTO_BASE"):
        assert expected in names
    assert names == sorted(set(names))


def test_a_renamed_env_var_is_reported_not_silently_ignored(capsys):
    from cpt.cli import RENAMED_ENV_VARS, warn_about_renamed_env_vars

    assert all(new in env_vars() and old not in env_vars() for old, new in RENAMED_ENV_VARS.items())
    assert warn_about_renamed_env_vars({"CPT_LOADER_THREADS": "2"}) == [
        "CPT_LOADER_THREADS is no longer read; set CPT_LOADER_WORKERS instead"]
    assert "CPT_LOADER_WORKERS" in capsys.readouterr().err
    assert warn_about_renamed_env_vars({"CPT_LOADER_THREADS": "2", "CPT_LOADER_WORKERS": "2"}) == []


def test_init_base_refuses_a_non_empty_dir(tmp_path):
    target = tmp_path / "base"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    result = run_cpt("init-base", str(target))
    assert result.returncode == 3 and (target / "mine.txt").read_text() == "user data"


def test_changed_data_settings_never_orphan_checkpoints(tmp_path, tiny_base, small_corpus):
    env = fast_env(tmp_path, tiny_base, small_corpus)
    assert run_cpt("run", env=env).returncode == 0
    run_dir = tmp_path / "run"
    shards_before = sorted(p.read_bytes() for p in (run_dir / "shards" / "train").glob("*.tokens.bin"))
    refused = run_cpt("run", "--max-seq-length", "32", env=env)
    assert refused.returncode == 3 and "--overwrite" in refused.stderr.splitlines()[-1]
    assert sorted(p.read_bytes() for p in (run_dir / "shards" / "train").glob("*.tokens.bin")) == shards_before
    redone = run_cpt("run", "--max-seq-length", "32", "--overwrite", env=env)
    assert redone.returncode == 0, redone.stderr
    aside = list(run_dir.glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "model" / "model.safetensors").exists()
    assert (aside[0] / "checkpoints" / "step-00000002").is_dir()


def test_every_command_is_one_row_of_the_table_with_the_options_of_its_config():
    from typer.main import get_command

    from cpt import config as cfg
    from cpt.cli import COMMANDS, app

    commands = get_command(app).commands
    assert list(commands) == [command.name for command in COMMANDS]
    for command in COMMANDS:
        assert [parameter.name for parameter in commands[command.name].params if parameter.name != "help"] == [
            item.name for _owner, item in cfg.option_fields(command.config)], command.name


def test_the_readme_names_every_flag_of_every_command():
    """README is the user's manual: a flag added to a config shows up in `--help` at once, and here until the
    README says what it does. The check is global: a new flag whose name another command's README text
    already uses passes unnoticed."""
    from pathlib import Path

    from typer.main import get_command

    from cpt.cli import app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    flags = [(name, flag) for name, command in get_command(app).commands.items()
             for parameter in command.params if parameter.param_type_name == "option"
             for flag in parameter.opts if flag.startswith("--") and flag != "--help"]
    missing = [f"cpt {name} {flag}" for name, flag in flags if not re.search(rf"(?<![\w-]){flag}(?![\w-])", readme)]
    assert not missing, f"README.md does not mention: {', '.join(missing)}"


def test_init_from_uer_is_converted_into_the_run_dir_once_per_file(tmp_path, tiny_base):
    from cpt.config import TrainConfig
    from cpt.errors import BadInput
    from cpt.export.convert import hf_to_uer
    from cpt.pipeline import UER_INIT_RECORD, convert_init_from_uer
    from cpt.training.model import UER_INIT_DIR

    uer_file = tmp_path / "model.bin-5000"
    hf_to_uer(tiny_base, uer_file)
    config = TrainConfig(output=tmp_path / "run", base_model=tiny_base, init_from_uer=uer_file)
    target = convert_init_from_uer(config)
    assert target == tmp_path / "run" / UER_INIT_DIR and (target / "model.safetensors").is_file()
    record = json.loads((target / UER_INIT_RECORD).read_text())
    inode = (target / "model.safetensors").stat().st_ino
    assert convert_init_from_uer(config) == target and (target / "model.safetensors").stat().st_ino == inode

    stat = uer_file.stat()
    os.utime(uer_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new file under the same name
    convert_init_from_uer(config)
    assert json.loads((target / UER_INIT_RECORD).read_text())["uer_mtime_ns"] == record["uer_mtime_ns"] + 10**9

    (target / UER_INIT_RECORD).unlink()  # a uer-init/ cpt cannot tell it wrote is never replaced
    with pytest.raises(BadInput, match="cpt did not write it"):
        convert_init_from_uer(config)
    assert (target / "model.safetensors").stat().st_ino != inode and (target / "config.json").is_file()
