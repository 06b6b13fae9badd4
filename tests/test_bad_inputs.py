"""Bad input battery: every bad flag, env var, corpus, base model or output dir gets exit 3 (2 for a malformed
flag), ONE line on stderr starting `cpt: error:` that names the problem and the fix, no traceback, and the
inputs byte-identical afterwards.

Most cases run in-process through typer's CliRunner on `cpt.cli.app` (the same code path as `python -m cpt`
minus interpreter start-up; `test_cli_runner_agrees_with_a_real_process` checks that), each driving the single
stage that fails. The 50 MB single-line corpus runs in real processes, with its memory measured.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SAMPLE_CORPUS, cpt_command, prepare_and_tokenize, run_main
from typer.testing import CliRunner

from cpt.cli import app

FAST_ENV = {
    "CPT_MAX_SEQ_LENGTH": "64", "CPT_MICRO_BATCH_SIZE": "4", "CPT_GLOBAL_BATCH_SIZE": "8", "CPT_MAX_STEPS": "2",
    "CPT_EVAL_INTERVAL": "2", "CPT_SAVE_INTERVAL": "2", "CPT_EVAL_MAX_SEQUENCES": "8", "CPT_WORKERS": "1",
    "CPT_VAL_FRACTION": "0.1", "CPT_DEVICE": "cpu",
}


# ---- helpers -----------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` -> its content hash (files), 'dir', or the link target (links, never followed)."""
    found: dict[str, str] = {}
    for root in roots:
        paths = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
        for path in paths:
            if path.is_symlink():
                found[str(path)] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[str(path)] = "dir"
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path)] = "absent"
    return found


def invoke(args: list[str], env: dict[str, str]):
    """`cpt ARGS` in-process; env vars are set only for the call (conftest already cleared CPT_*)."""
    return CliRunner().invoke(app, args, env=env, catch_exceptions=True)


def the_error_line(stderr: str) -> str:
    """The one `cpt: error:` line, which must also be the last thing on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("cpt: error:")]
    assert len(errors) == 1, f"want exactly one 'cpt: error:' line, got:\n{stderr}"
    assert lines[-1] == errors[0], f"the error line must come last:\n{stderr}"
    return errors[0]


@dataclass
class Case:
    """One bad input: how to set it up, which command to run, what the one line must say."""

    make: Callable[[Setup], tuple[list[str], dict[str, str]]]
    fragments: tuple[str, ...]
    exit_code: int = 3
    bug: str = ""  # a known bug: the case is marked xfail(strict) with this reason


@dataclass
class Setup:
    tmp: Path
    base: Path
    corpus: Path
    tokenized_template: Path

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def tokenized_run(self) -> Path:
        """A copy of a prepared and tokenized run dir (the train/export stages' input)."""
        shutil.copytree(self.tokenized_template, self.run_dir)
        return self.run_dir

    def env(self, **extra: str) -> dict[str, str]:
        return {**FAST_ENV, "CPT_CORPUS": str(self.corpus), "CPT_BASE_MODEL": str(self.base),
                "CPT_OUTPUT": str(self.run_dir), **extra}

    def write_corpus(self, name: str, data: bytes) -> Path:
        path = self.tmp / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def edit_config(self, **changes) -> None:
        config = json.loads((self.base / "config.json").read_text())
        config.update(changes)
        (self.base / "config.json").write_text(json.dumps(config, indent=2))


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized_template(tmp_path_factory, tiny_base_template) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:60]) + "\n", encoding="utf-8")
    run_dir = tmp_path_factory.mktemp("tokenized") / "run"
    prepare_and_tokenize(run_dir, corpus, tiny_base_template)
    return run_dir


@pytest.fixture
def setup(tmp_path, tiny_base, small_corpus, tokenized_template) -> Setup:
    return Setup(tmp=tmp_path, base=tiny_base, corpus=small_corpus, tokenized_template=tokenized_template)


# ---- the battery -------------------------------------------------------------------------------------------


def _run(*flags: str, **env: str) -> Callable[[Setup], tuple[list[str], dict[str, str]]]:
    """`cpt run FLAGS` with the fast settings from env vars: these cases fail in config validation."""
    return lambda s: (["run", *flags], s.env(**env))


def _prepare_with(name: str, data: bytes, *flags: str):
    def make(s: Setup):
        return ["prepare", *flags], s.env(CPT_CORPUS=str(s.write_corpus(name, data)))
    return make


def _symlink_loop(s: Setup):
    loop_dir = s.tmp / "inputs"
    loop_dir.mkdir()
    (loop_dir / "a.txt").symlink_to(loop_dir / "b.txt")
    (loop_dir / "b.txt").symlink_to(loop_dir / "a.txt")
    return ["prepare"], s.env(CPT_CORPUS=str(loop_dir / "a.txt"))


def _symlink_loop_dir(s: Setup):
    loop_dir = s.tmp / "inputs"
    loop_dir.mkdir()
    (loop_dir / "a.txt").symlink_to(loop_dir / "b.txt")
    (loop_dir / "b.txt").symlink_to(loop_dir / "a.txt")
    (loop_dir / "self").symlink_to(loop_dir)
    return ["prepare"], s.env(CPT_CORPUS=str(loop_dir))


def _dir_without_text(s: Setup):
    folder = s.tmp / "inputs"
    folder.mkdir()
    (folder / "notes.md").write_text("# 笔记\n" * 20)
    (folder / "data.parquet").write_bytes(b"PAR1" + bytes(64))
    return ["prepare"], s.env(CPT_CORPUS=str(folder))


def _base_edit(command: str, edit: Callable[[Setup], None], *flags: str):
    """Break a copy of the base model, then run the first stage that reads the broken part."""
    def make(s: Setup):
        edit(s)
        if command in ("tokenize", "train", "export"):
            s.tokenized_run()
        return [command, *flags], s.env()
    return make


def _drop_vocab_lines(s: Setup) -> None:
    lines = (s.base / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (s.base / "vocab.txt").write_text("\n".join(lines[:-100]) + "\n", encoding="utf-8")


def _base_is_a_file(s: Setup):
    s.tokenized_run()
    weights = s.tmp / "inputs" / "weights.bin"
    weights.parent.mkdir()
    shutil.copyfile(s.base / "pytorch_model.bin", weights)
    return ["tokenize"], s.env(CPT_BASE_MODEL=str(weights))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _output_is_file(s: Setup):
    target = s.tmp / "notes.txt"
    target.write_text("my notes, not a run dir\n")
    return ["prepare"], s.env(CPT_OUTPUT=str(target))


def _output_with_user_files(s: Setup):
    s.run_dir.mkdir()
    (s.run_dir / "thesis.docx").write_bytes(b"PK\x03\x04 my thesis")
    (s.run_dir / "data").mkdir()
    (s.run_dir / "data" / "train.txt").write_text("我的数据\n")
    return ["run"], s.env()


def _output_under_a_file(s: Setup):
    blocker = s.tmp / "a-regular-file"
    blocker.write_text("x")
    return ["prepare"], s.env(CPT_OUTPUT=str(blocker / "run"))


def _resume_garbage(s: Setup):
    s.tokenized_run()
    garbage = s.tmp / "step-00000007"
    garbage.mkdir()
    (garbage / "state.json").write_text("{not json")
    return ["train", "--resume", str(garbage)], s.env()


def _resume_never_with_checkpoints(s: Setup):
    run_dir = s.tokenized_run()
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    return ["train", "--resume", "never"], s.env()


def _export_missing_step(s: Setup):
    s.tokenized_run()
    return ["export", "--checkpoint", "step-00000099"], s.env()


def _train_before_tokenize(s: Setup):
    s.run_dir.mkdir()
    return ["train"], s.env()


CASES: dict[str, Case] = {
    # numbers and choices (config validation, before any work)
    "max-steps-zero": Case(_run("--max-steps", "0"), ("--max-steps 0", ">= 1")),
    "save-interval-negative": Case(_run("--save-interval", "-3"), ("--save-interval -3", ">= 1")),
    "lr-nan-from-env": Case(_run(CPT_LR="nan"), ("--lr nan",)),
    "lr-negative": Case(_run("--lr", "-1e-4"), ("--lr -0.0001",)),
    "mask-prob-zero": Case(_run("--mask-prob", "0"), ("--mask-prob 0.0",)),
    "span-p-above-one": Case(_run("--span-p", "1.5"), ("--span-p 1.5",)),
    "val-fraction-nan": Case(_run("--val-fraction", "nan"), ("--val-fraction nan", "[0, 0.5)")),
    "min-chars-zero": Case(_run("--min-chars", "0"), ("--min-chars 0",)),
    "unknown-masking-mode": Case(_run("--masking", "bert-style"), ("--masking 'bert-style'", "wwm+span")),
    "unknown-masking-mode-from-env": Case(_run(CPT_MASKING="whole-word"), ("--masking 'whole-word'", "wwm+span")),
    "unknown-export-format": Case(_run("--format", "onnx"), ("--format 'onnx'", "safetensors")),
    "batch-sizes-do-not-divide": Case(_run(CPT_MICRO_BATCH_SIZE="3"), ("--global-batch-size 8", "--micro-batch-size 3")),
    "micro-batch-zero": Case(_run("--micro-batch-size", "0"), ("--micro-batch-size '0'", "positive integer or auto")),
    "micro-batch-garbage": Case(_run("--micro-batch-size", "lots"), ("--micro-batch-size 'lots'", "auto")),
    "max-seq-length-below-8": Case(_run("--max-seq-length", "4"), ("--max-seq-length 4", ">= 8")),
    "max-time-garbage": Case(_run("--max-time", "soon"), ("--max-time 'soon'", "90m")),
    "warmup-below-minus-one": Case(_run("--warmup-steps", "-2"), ("--warmup-steps -2",)),
    "loader-workers-below-minus-one": Case(_run("--loader-workers", "-3"), ("--loader-workers -3",)),
    "workers-negative": Case(_run("--workers", "-1"), ("--workers -1",)),
    "output-missing": Case(lambda s: (["prepare"], {k: v for k, v in s.env().items() if k != "CPT_OUTPUT"}),
                           ("--output / CPT_OUTPUT is required",)),
    "init-from-uer-missing": Case(_run("--init-from-uer", "/nonexistent/model.bin-5000"),
                                  ("--init-from-uer /nonexistent/model.bin-5000", "no such file")),
    "jieba-dict-missing": Case(_run("--jieba-dict", "/nonexistent/user.dict"), ("--jieba-dict /nonexistent/user.dict",)),
    # malformed values: usage errors
    "max-steps-not-a-number-env": Case(_run(CPT_MAX_STEPS="many"), ("CPT_MAX_STEPS",), exit_code=2),
    "lr-not-a-number": Case(_run("--lr", "fast"), ("--lr",), exit_code=2),
    "unknown-flag": Case(_run("--no-such-flag"), ("--no-such-flag",), exit_code=2),
    # corpus files (the prepare stage)
    "corpus-not-utf8": Case(_prepare_with("gbk.txt", "第一行文本内容\n".encode() + "中文文本".encode("gbk") + b"\n"),
                            ("gbk.txt:2", "invalid UTF-8", "--on-decode-error")),
    "corpus-whitespace-only": Case(_prepare_with("blank.txt", " \n\t\t\n\u3000\u3000\n\n".encode()),
                                   ("no document left", "--min-chars")),
    "corpus-empty-file": Case(_prepare_with("empty.txt", b""), ("no document left",)),
    "corpus-binary": Case(_prepare_with("model.txt", b"\x00\x01\x02" * 100), ("model.txt", "binary")),
    "corpus-truncated-gzip": Case(_prepare_with("docs.txt.gz", gzip.compress("很长的文档内容。\n".encode() * 500)[:60]),
                                  ("docs.txt.gz", "gzip")),
    "corpus-jsonl-without-field": Case(_prepare_with("docs.jsonl", b'{"content": "\xe6\x96\x87\xe6\x9c\xac"}\n'),
                                       ("docs.jsonl:1", "--text-field")),
    "corpus-missing": Case(lambda s: (["prepare"], s.env(CPT_CORPUS="/nonexistent/corpus")),
                           ("/nonexistent/corpus", "no such file")),
    "corpus-glob-matches-nothing": Case(lambda s: (["prepare"], s.env(CPT_CORPUS=str(s.tmp / "*.jsonl"))),
                                        ("matches no file",)),
    "corpus-dir-without-text-files": Case(_dir_without_text, ("holds no .txt",)),
    "corpus-symlink-loop": Case(_symlink_loop, ("a.txt", "looping link")),
    "corpus-dir-of-symlink-loops": Case(_symlink_loop_dir, ("holds no .txt",)),
    # base model dirs
    "base-missing": Case(lambda s: (["run"], s.env(CPT_BASE_MODEL="/nonexistent/base")),
                         ("/nonexistent/base", "config.json")),
    "base-is-a-file": Case(_base_is_a_file, ("weights.bin", "no such directory")),
    "base-config-not-json": Case(_base_edit("run", lambda s: (s.base / "config.json").write_text("{'model_type': bert")),
                                 ("config.json", "Hugging Face model dir")),
    "base-without-weights": Case(_base_edit("run", lambda s: (s.base / "pytorch_model.bin").unlink()),
                                 ("no model.safetensors or pytorch_model.bin",)),
    "base-model-type-gpt2": Case(_base_edit("run", lambda s: s.edit_config(model_type="gpt2")),
                                 ("model_type 'gpt2'", "BERT-family")),
    "base-vocab-does-not-match-config": Case(_base_edit("tokenize", _drop_vocab_lines),
                                             ("21028 tokens", "vocab_size is 21128")),
    "base-without-tokenizer": Case(_base_edit("tokenize", lambda s: (s.base / "vocab.txt").unlink()),
                                   ("no tokenizer.json or vocab.txt",)),
    "base-weights-do-not-match-config": Case(
        _base_edit("train", lambda s: s.edit_config(hidden_size=128, intermediate_size=256)), ("--base-model",)),
    "base-weights-truncated": Case(_base_edit("train", lambda s: _truncate(s.base / "pytorch_model.bin")),
                                   ("base-model", "cannot load", "corrupt")),
    "base-weights-garbage-safetensors": Case(
        _base_edit("train", lambda s: (s.base / "model.safetensors").write_bytes(b"\xff" * 4096)),
        ("base-model", "model.safetensors")),
    "max-seq-length-above-positions": Case(_base_edit("tokenize", lambda s: None, "--max-seq-length", "4096"),
                                           ("--max-seq-length 4096", "max_position_embeddings 128")),
    # output dirs
    "output-is-a-file": Case(_output_is_file, ("notes.txt", "is a file")),
    "output-holds-user-files": Case(_output_with_user_files, ("not empty and holds no cpt run", "--overwrite")),
    "output-unwritable": Case(_output_under_a_file, ("a-regular-file/run", "not writable")),
    # stage order, resume and export
    "train-before-tokenize": Case(_train_before_tokenize, ("shards/manifest.json is missing", "cpt tokenize")),
    "resume-garbage": Case(_resume_garbage, ("--resume", "not a valid checkpoint")),
    "resume-never-with-checkpoints": Case(_resume_never_with_checkpoints, ("--resume never", "new --output")),
    "export-step-missing": Case(_export_missing_step, ("step-00000099", "missing or incomplete")),
}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(reason=case.bug, strict=True)) if case.bug else name
    for name, case in CASES.items()
])
def test_bad_input_is_one_line_and_leaves_inputs_alone(name, setup):
    case = CASES[name]
    args, env = case.make(setup)
    inputs = [path for path in (setup.base, setup.corpus, setup.tmp / "inputs") if path.exists() or path.is_symlink()]
    before = snapshot(*inputs)
    user_files = snapshot(setup.run_dir) if name == "output-holds-user-files" else None

    result = invoke(args, env)

    assert result.exit_code == case.exit_code, f"{name}: exit {result.exit_code}\n{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in result.stderr
    if case.exit_code == 3:
        line = the_error_line(result.stderr)
        for fragment in case.fragments:
            assert fragment in line, f"{fragment!r} not in {line!r}"
    else:
        assert all(fragment in result.stderr for fragment in case.fragments), result.stderr
    assert snapshot(*inputs) == before, "cpt changed its inputs"
    if user_files is not None:
        assert snapshot(setup.run_dir) == user_files, "cpt touched the user's files in --output"


@pytest.mark.parametrize("name", ["max-steps-not-a-number-env", "lr-not-a-number", "unknown-flag"])
def test_usage_errors_are_one_line_too(name, setup, monkeypatch, capsys):
    args, env = CASES[name].make(setup)
    code, stderr = run_main(args, env, monkeypatch, capsys)
    assert code == 2
    line = the_error_line(stderr)
    assert all(fragment in line for fragment in CASES[name].fragments), line


def test_weights_that_do_not_match_the_config_name_the_tensor(setup):
    setup.edit_config(hidden_size=128, intermediate_size=256)
    setup.tokenized_run()
    result = invoke(["train"], setup.env())
    assert result.exit_code == 3, result.stderr
    line = the_error_line(result.stderr)
    assert "above report" not in line
    assert "shape" in line and "word_embeddings" in line


# ---- real processes ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_runner_agrees_with_a_real_process(setup):
    """The in-process runs above stand for `python -m cpt`: same exit code, same error line."""
    cases = ["unknown-masking-mode", "corpus-not-utf8", "output-is-a-file", "max-steps-not-a-number-env"]
    for name in cases:
        args, env = CASES[name].make(setup)
        in_process = invoke(args, env)
        real = subprocess.run([*cpt_command(), *args], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
        assert real.returncode == in_process.exit_code == CASES[name].exit_code, (name, real.stderr)
        assert "Traceback" not in real.stderr
        if CASES[name].exit_code == 3:
            assert the_error_line(real.stderr) == the_error_line(in_process.stderr)
        shutil.rmtree(setup.run_dir, ignore_errors=True)


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its direct children (the tokenizer workers), from /proc."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for member in [pid, *map(int, children)]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


LONG_LINE_BYTES = 16 * 2**20  # 50 MB was measured once (1.33 GiB peak, ~90 s); 16 MB keeps CI fast, same windows
RSS_LIMIT_BYTES = 2 * 2**30


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures memory through /proc")
def test_a_50mb_single_line_is_tokenized_in_bounded_memory_or_refused(setup):
    text = "".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines())
    repeats = LONG_LINE_BYTES // len(text.encode()) + 1
    line = (text * repeats).encode()[:LONG_LINE_BYTES].decode("utf-8", errors="ignore")
    corpus = setup.write_corpus("one-line.txt", (line + "\n").encode())
    env = {**os.environ, **setup.env(CPT_CORPUS=str(corpus))}
    before = snapshot(corpus)

    prepared = subprocess.run([*cpt_command(), "prepare"], env=env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode in (0, 3), prepared.stderr
    if prepared.returncode == 3:  # refusing the document clearly is an acceptable answer too
        assert "one-line.txt" in the_error_line(prepared.stderr)
        return
    rss_peak = 0
    process = subprocess.Popen([*cpt_command(), "tokenize"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline and rss_peak <= RSS_LIMIT_BYTES:
            rss_peak = max(rss_peak, _tree_rss_bytes(process.pid))
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        _out, stderr = process.communicate()
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"tokenize of a {LONG_LINE_BYTES >> 20} MB line: rss peak >= {rss_peak / 2**30:.2f} GiB "
          f"(/proc), ru_maxrss of children {children_peak / 2**30:.2f} GiB, exit {process.returncode}")
    assert rss_peak <= RSS_LIMIT_BYTES, f"tokenize used more than {RSS_LIMIT_BYTES >> 30} GiB on a 50 MB input"
    assert process.returncode in (0, 3), stderr
    if process.returncode == 3:
        assert "cpt: error:" in the_error_line(stderr)
    assert snapshot(corpus) == before
