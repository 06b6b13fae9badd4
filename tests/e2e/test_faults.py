"""Fault injection: SIGKILL at every stage, SIGTERM (once and twice), corrupt checkpoints, a full disk.

Kill points are made deterministic without sleeps: the killed process is `python -c HOOKED POINT MARKERS cpt
ARGS...`, a small wrapper that replaces one cpt function (a writer, the step, a stage) with one that SIGKILLs
its own process group at that exact point (or waits there, polling its own state, for the test's signal), then
runs `cpt.cli.main()`. One kill is also sent from outside at a point found by polling metrics.jsonl. After each
kill the test checks what is on disk; a final normal rerun must end with exactly the result of an uninterrupted
run in another dir (bit-identical exported weights, same best checkpoint and metrics), with no partial output
picked up and no temp file left.

The in-process tests (corrupt checkpoints, ENOSPC) share one small trained run and go through the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_CORPUS, prepare_and_tokenize, run_main
from typer.testing import CliRunner

from cpt.cli import app
from cpt.common.weights import read_state_dict
from cpt.config import TrainConfig
from cpt.training import checkpoint as ckpt
from cpt.training.loop import train

MAX_STEPS = 10
RUN_ENV = {
    "CPT_MAX_SEQ_LENGTH": "64", "CPT_MICRO_BATCH_SIZE": "4", "CPT_GLOBAL_BATCH_SIZE": "8",
    "CPT_MAX_STEPS": str(MAX_STEPS), "CPT_SAVE_INTERVAL": "3", "CPT_EVAL_INTERVAL": "1000", "CPT_LOG_INTERVAL": "1",
    "CPT_EVAL_MAX_SEQUENCES": "8", "CPT_WORKERS": "1", "CPT_VAL_FRACTION": "0.1", "CPT_LR": "1e-3",
    "CPT_WARMUP_STEPS": "2", "CPT_BEST_METRIC": "val_mlm_loss", "CPT_KEEP_CHECKPOINTS": "2", "CPT_SEED": "7",
    "CPT_DEVICE": "cpu",
    # One intra-op thread: these tiny models run several times faster without thread hand-offs, most of all
    # on a busy 2-core CI box; every run here uses the same setting, so results still compare bit for bit.
    "OMP_NUM_THREADS": "1",
}
TIMING_KEYS = ("tokens_per_s", "data_wait_share", "elapsed_s")

# The wrapper the killed processes run: argv = [-c, POINT, MARKER_DIR, cpt args...].
HOOKED = r'''
import io, os, signal, sys, time
from pathlib import Path

point, markers = sys.argv[1], Path(sys.argv[2])


def die():
    sys.stderr.flush()
    os.killpg(0, signal.SIGKILL)  # the whole group: cpt and its tokenizer workers, like a pod kill


def mark(name):
    (markers / name).write_text(str(time.monotonic()))


def stop_signal():
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__self__", None)


def wait_for_sigterm(count):
    """Block here (at most 120 s) until cpt's own handler has seen `count` SIGTERMs."""
    deadline = time.monotonic() + 120
    seen = 0
    while time.monotonic() < deadline:
        handler = stop_signal()
        seen = 1 if handler is not None and handler.requested else 0
        if seen >= count:
            return
        time.sleep(0.01)
    raise SystemExit("hook: no SIGTERM within 120 s")


if point == "prepare":  # mid-way through writing corpus/.train.txt.tmp
    import cpt.data.prepare as target
    original, written = target._write_doc, []

    def hooked(handle, text, counts, split):
        original(handle, text, counts, split)
        written.append(1)
        if len(written) == 20:
            handle.flush()
            die()
    target._write_doc = hooked
elif point == "tokenize":  # train chunks done, val not started: request.json but no shards/manifest.json
    import cpt.data.tokenization as target
    original = target._tokenize_split

    def hooked(pool, run_dir, split, config, dtype):
        if split == "val":
            die()
        return original(pool, run_dir, split, config, dtype)
    target._tokenize_split = hooked
elif point == "checkpoint":  # half of step-6's optimizer.pt on disk
    import torch
    import cpt.training.checkpoint as target
    original = target._torch_save

    def hooked(obj, path):
        if path.parent.name == ".step-00000006.tmp" and path.name == "optimizer.pt":
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            die()
        return original(obj, path)
    target._torch_save = hooked
elif point == "export":  # half of model/'s model.safetensors written into .model.tmp
    import cpt.common.weights as target
    original = target.save_file

    def hooked(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        if ".model.tmp" in str(filename):
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            die()
    target.save_file = hooked
elif point in ("sigterm-once", "sigterm-twice"):
    import cpt.training.checkpoint as checkpoint
    import cpt.training.loop as target
    original_step, original_save = target.train_step, checkpoint._torch_save
    at_step = 7 if point == "sigterm-once" else 5

    def hooked_step(session, state, *args, **kwargs):
        if state.step + 1 == at_step:  # inside step `at_step`: wait for the test's SIGTERM, then do the step
            mark(f"in-step-{at_step}")
            wait_for_sigterm(1)
        return original_step(session, state, *args, **kwargs)

    def hooked_save(obj, path):
        if point == "sigterm-twice" and path.name == "optimizer.pt" and stop_signal() and stop_signal().requested:
            mark("saving")  # the checkpoint after the first SIGTERM is being written: wait for the second
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)  # cpt's handler raises SystemExit(4) in here on the second SIGTERM
            raise SystemExit("hook: no second SIGTERM within 120 s")
        return original_save(obj, path)
    target.train_step, checkpoint._torch_save = hooked_step, hooked_save
else:
    raise SystemExit(f"unknown kill point {point}")

sys.argv = ["cpt", *sys.argv[3:]]
from cpt.cli import main

main()
'''


# ---- helpers -----------------------------------------------------------------------------------------------


def write_corpus(path: Path) -> Path:
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:60]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_env(run_dir: Path, base: Path, corpus: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **RUN_ENV, "CPT_CORPUS": str(corpus), "CPT_BASE_MODEL": str(base),
            "CPT_OUTPUT": str(run_dir), **extra}


def cpt_run(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpt", "run", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def run_hooked(point: str, markers: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`cpt run` that SIGKILLs itself at `point`."""
    markers.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", HOOKED, point, str(markers), "run"], env=env, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def start_hooked(point: str, markers: Path, env: dict[str, str]) -> subprocess.Popen:
    markers.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", HOOKED, point, str(markers), "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    """Poll file state until `condition()` holds; fail if the process ends first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            _out, err = process.communicate()
            pytest.fail(f"cpt exited ({process.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.01)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.exists() else []


def steps_logged(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """relative path -> content hash, for every file under root."""
    return {str(path.relative_to(root)): sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


def latest_valid(run_dir: Path) -> str | None:
    path = ckpt.latest_valid_checkpoint(run_dir)
    return path.name if path else None


def squash(text: str) -> str:
    """Text without whitespace: rich wraps long console lines, even inside paths."""
    return "".join(text.split())


def assert_same_result(run_dir: Path, reference: Path) -> None:
    """The run ended exactly as the uninterrupted reference: export, best, final checkpoint, logged numbers."""
    assert json.loads((run_dir / "best.json").read_text()) == json.loads((reference / "best.json").read_text())
    for name in ("model.safetensors", "pytorch_model.bin"):
        got, want = read_state_dict(run_dir / "model" / name), read_state_dict(reference / "model" / name)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"model/{name}: {key} differs from the uninterrupted run"
    assert sha256(run_dir / "model" / "model.safetensors") == sha256(reference / "model" / "model.safetensors")
    final = ckpt.step_dir(run_dir, MAX_STEPS).name
    assert sha256(run_dir / "checkpoints" / final / "model.safetensors") == \
        sha256(reference / "checkpoints" / final / "model.safetensors")
    want_lines = {entry["step"]: entry for entry in metrics(reference)}
    got_lines: dict[int, dict] = {}
    for entry in metrics(run_dir):  # an interrupt adds an eval line for its step: merge it
        got_lines.setdefault(entry["step"], {}).update(entry)
    got_steps = [entry["step"] for entry in metrics(run_dir)]
    assert got_steps == sorted(got_steps), "metrics.jsonl goes back in steps after a resume"
    assert set(want_lines) <= set(got_lines)
    for step, want in want_lines.items():
        for key, value in want.items():
            if key not in TIMING_KEYS:
                assert got_lines[step][key] == value, f"metrics step {step}: {key}"
    assert all(ckpt.is_valid_checkpoint(path) for _step, path in ckpt.step_dirs(run_dir))
    leftovers = [str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.name.endswith((".tmp", ".old"))]
    assert not leftovers, f"temp files left behind: {leftovers}"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """In-process training with one thread, like the subprocesses (see RUN_ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the uninterrupted reference ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base_template) -> Path:
    """`cpt run` with RUN_ENV, never interrupted: what every interrupted run must end with."""
    root = tmp_path_factory.mktemp("reference")
    base = root / "base-model"
    shutil.copytree(tiny_base_template, base)
    corpus = write_corpus(root / "corpus.txt")
    result = cpt_run(run_env(root / "run", base, corpus))
    assert result.returncode == 0, result.stderr
    saves = [entry["val_mlm_loss"] for entry in metrics(root / "run") if "val_mlm_loss" in entry and entry["step"]]
    # The last step must be the best, so the export reflects every step (and an extra eval cannot win).
    assert saves == sorted(saves, reverse=True), f"val_mlm_loss does not fall steadily: {saves}"
    assert json.loads((root / "run" / "best.json").read_text())["step"] == MAX_STEPS
    return root / "run"


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


# ---- SIGKILL at every stage --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_each_stage_then_rerun_gives_the_uninterrupted_result(tmp_path, tiny_base, corpus, reference):
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    env = run_env(run_dir, tiny_base, corpus)
    base_before = tree(tiny_base)

    # 1. prepare: killed while writing the train split
    killed = run_hooked("prepare", markers, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run_dir / "corpus" / ".train.txt.tmp").stat().st_size > 0
    assert not (run_dir / "corpus" / "manifest.json").exists() and not (run_dir / "corpus" / "train.txt").exists()

    # 2. tokenize: killed after the train chunks, before the val split and the manifest
    killed = run_hooked("tokenize", markers, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "prepare:" in killed.stderr and "uptodate" not in squash(killed.stderr), "prepare must be redone"
    assert (run_dir / "shards" / "request.json").is_file()
    assert (run_dir / "shards" / "train" / "chunk-00000.offsets.npy").is_file()
    assert not (run_dir / "shards" / "manifest.json").exists()

    # 3. training: killed from outside between steps (found by polling metrics.jsonl: step 0 and two steps logged)
    process = subprocess.Popen([sys.executable, "-m", "cpt", "run"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: steps_logged(run_dir) >= 3, process, "3 lines in metrics.jsonl")
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        _out, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert "corpusisuptodate" in squash(stderr), "prepare must be skipped"
    assert (run_dir / "shards" / "manifest.json").is_file()
    assert not (run_dir / "model").exists()
    assert latest_valid(run_dir) in (None, "step-00000003")

    # 4. checkpoint: killed half-way through step 6's optimizer.pt
    killed = run_hooked("checkpoint", markers, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = run_dir / "checkpoints" / ".step-00000006.tmp"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (run_dir / "checkpoints" / "step-00000006").exists()
    assert latest_valid(run_dir) == "step-00000003"

    # 5. export: killed half-way through the exported model.safetensors
    killed = run_hooked("export", markers, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "resumed from" in killed.stderr and "step-00000003" in squash(killed.stderr)
    assert (run_dir / ".model.tmp" / ".model.safetensors.tmp").is_file()
    assert not (run_dir / "model").exists() and not (run_dir / "export.json").exists()
    assert latest_valid(run_dir) == ckpt.step_dir(run_dir, MAX_STEPS).name

    # 6. a normal rerun finishes what is left and ends exactly like the uninterrupted run
    final = cpt_run(env)
    assert final.returncode == 0, final.stderr
    assert squash(final.stderr).count("uptodate") == 2, "prepare and tokenize must be skipped"
    assert "step 1/" not in final.stderr, "training must not start over"
    assert_same_result(run_dir, reference)
    assert tree(tiny_base) == base_before


@pytest.mark.slow
def test_sigterm_checkpoints_within_one_step_and_a_second_sigterm_aborts_at_once(tmp_path, tiny_base, corpus,
                                                                                 reference):
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    env = run_env(run_dir, tiny_base, corpus)

    # Two SIGTERMs: the first arrives inside step 5, the second while step 5's checkpoint is being written.
    process = start_hooked("sigterm-twice", markers, env)
    try:
        wait_for(lambda: (markers / "in-step-5").exists(), process, "step 5")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: (markers / "saving").exists(), process, "the checkpoint after the first SIGTERM")
        second_sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _out, stderr = process.communicate(timeout=60)
        exit_seconds = time.monotonic() - second_sent
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 4, stderr
    assert exit_seconds < 30, f"the second SIGTERM took {exit_seconds:.1f} s to end the process"
    assert "received SIGTERM" in stderr
    assert not (run_dir / "checkpoints" / "step-00000005").exists()
    assert latest_valid(run_dir) == "step-00000003", "the last valid checkpoint must survive the abort"

    # One SIGTERM inside step 7: step 7 finishes, is checkpointed, exit 4 with one line.
    process = start_hooked("sigterm-once", markers, env)
    try:
        wait_for(lambda: (markers / "in-step-7").exists(), process, "step 7")
        process.send_signal(signal.SIGTERM)
        _out, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 4, stderr
    assert "step-00000003" in squash(stderr) and "resumed from" in stderr
    last_line = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last_line.startswith("cpt: error: interrupted at step 7") and "rerun" in last_line
    assert latest_valid(run_dir) == "step-00000007", "SIGTERM must cost at most the step in progress"
    assert not (run_dir / "model").exists()

    final = cpt_run(env)
    assert final.returncode == 0, final.stderr
    assert "step-00000007" in squash(final.stderr) and "resumed from" in final.stderr
    assert_same_result(run_dir, reference)


# ---- checkpoints on disk: corrupt, partial, the best pointer -----------------------------------------------

TRAINED_SETTINGS = dict(micro_batch_size=4, global_batch_size=8, max_steps=4, lr=1e-3, warmup_steps=0,
                        eval_interval=1000, save_interval=2, eval_max_sequences=8, keep_checkpoints=3, seed=7,
                        best_metric="val_mlm_loss", device="cpu")


def train_env(run_dir: Path, base: Path, **overrides) -> dict[str, str]:
    settings = {**TRAINED_SETTINGS, **overrides}
    return {"CPT_OUTPUT": str(run_dir), "CPT_BASE_MODEL": str(base),
            **{f"CPT_{key.upper()}": str(value) for key, value in settings.items()}}


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory, tiny_base_template) -> Path:
    """A run dir trained 4 steps in-process: checkpoints step-2 and step-4, best.json -> step 4."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.txt")
    run_dir = root / "run"
    prepare_and_tokenize(run_dir, corpus, tiny_base_template)
    shutil.copytree(run_dir, root / "tokenized")
    train(TrainConfig(output=run_dir, base_model=tiny_base_template, **TRAINED_SETTINGS))
    assert [step for step, _path in ckpt.valid_checkpoints(run_dir)] == [2, 4]
    assert ckpt.best_pointer(run_dir)["step"] == 4
    return run_dir


@pytest.fixture
def trained_run(trained_template, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_template, run_dir)
    return run_dir


def invoke(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(app, args, env=env, catch_exceptions=True)


def corrupt(step_path: Path, how: str) -> None:
    if how == "truncated-weights":
        data = (step_path / "model.safetensors").read_bytes()
        (step_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "no-state-file":
        (step_path / "state.json").unlink()
    elif how == "garbage-state-file":
        (step_path / "state.json").write_text('{"train_state": {"step": 4}, "files": ')
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated-weights", "no-state-file", "garbage-state-file"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(trained_run, tiny_base, how):
    step2, step4 = ckpt.step_dir(trained_run, 2), ckpt.step_dir(trained_run, 4)
    step2_before = tree(step2)
    trained_weights = sha256(step4 / "model.safetensors")
    corrupt(step4, how)

    result = invoke(["train"], train_env(trained_run, tiny_base))

    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    assert "step-00000004isincompleteorcorrupt" in squash(result.stderr), "a warning must name the bad checkpoint"
    assert "resumedfrom" in squash(result.stderr) and "step-00000002(step2)" in squash(result.stderr)
    assert tree(step2) == step2_before
    assert ckpt.is_valid_checkpoint(step4)
    assert sha256(step4 / "model.safetensors") == trained_weights, "the redone steps must be bit-identical"


def test_export_latest_skips_a_corrupt_newest_checkpoint(trained_run, tiny_base):
    corrupt(ckpt.step_dir(trained_run, 4), "truncated-weights")
    result = invoke(["export", "--checkpoint", "latest", "--format", "safetensors"], train_env(trained_run, tiny_base))
    assert result.exit_code == 0, f"{result.stderr}\n{result.exception!r}"
    assert "step-00000004isincompleteorcorrupt" in squash(result.stderr)
    exported = read_state_dict(trained_run / "model" / "model.safetensors")
    trained = read_state_dict(ckpt.step_dir(trained_run, 2) / "model.safetensors")
    assert all(torch.equal(exported[key], value) for key, value in trained.items() if key in exported)


def test_export_best_refuses_a_corrupt_best_checkpoint(trained_run, tiny_base):
    corrupt(ckpt.step_dir(trained_run, 4), "no-state-file")
    result = invoke(["export"], train_env(trained_run, tiny_base))
    assert result.exit_code == 3
    line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert line.startswith("cpt: error: --checkpoint best:") and "step-00000004" in line and "latest" in line
    assert not (trained_run / "model").exists()


def test_no_valid_checkpoint_is_a_clear_error(trained_run, tiny_base):
    for step in (2, 4):
        corrupt(ckpt.step_dir(trained_run, step), "no-state-file")
    left_as_is = tree(trained_run / "checkpoints")
    result = invoke(["train"], train_env(trained_run, tiny_base))
    assert result.exit_code == 3, result.stderr
    line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert line.startswith("cpt: error:") and "no valid checkpoint" in line and "--resume" in line
    assert tree(trained_run / "checkpoints") == left_as_is


class KilledHere(BaseException):
    """Stands for SIGKILL in-process: nothing after the raise point runs (not an Exception: nothing catches it)."""


def test_kill_between_checkpoint_and_best_pointer_is_repaired_on_rerun(trained_template, tiny_base, tmp_path,
                                                                       monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_template.parent / "tokenized", run_dir)
    config = TrainConfig(output=run_dir, base_model=tiny_base, **{**TRAINED_SETTINGS, "max_steps": 2})
    real_write = ckpt.write_best_pointer

    def killed_before_pointer(run, step, metric, value):
        raise KilledHere(f"SIGKILL before best.json -> step {step}")

    monkeypatch.setattr(ckpt, "write_best_pointer", killed_before_pointer)
    with pytest.raises(KilledHere):
        train(config)
    monkeypatch.setattr(ckpt, "write_best_pointer", real_write)
    assert ckpt.is_valid_checkpoint(ckpt.step_dir(run_dir, 2)) and ckpt.best_pointer(run_dir) is None

    rerun = invoke(["train"], train_env(run_dir, tiny_base, max_steps=2))
    assert rerun.exit_code == 0, rerun.stderr
    export = invoke(["export", "--format", "safetensors"], train_env(run_dir, tiny_base, max_steps=2))
    assert export.exit_code == 0, export.stderr
    assert ckpt.best_pointer(run_dir)["step"] == 2


def test_kill_while_swapping_in_a_new_export_is_cleaned_up(trained_run, tiny_base, monkeypatch):
    from cpt.config import ExportConfig
    from cpt.export.export import export_model

    env = train_env(trained_run, tiny_base)
    assert invoke(["export", "--checkpoint", "step-00000002", "--format", "safetensors"], env).exit_code == 0
    real_rename = Path.rename

    def rename(self, target):
        if self.name == ".model.tmp":
            raise KilledHere("SIGKILL after model/ was moved aside, before the new export was moved in")
        return real_rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", rename)
        with pytest.raises(KilledHere):
            export_model(ExportConfig(output=trained_run, base_model=tiny_base, format="safetensors"))
    assert (trained_run / ".model.old").is_dir() and not (trained_run / "model").exists()

    result = invoke(["export", "--format", "safetensors"], env)
    assert result.exit_code == 0, result.stderr
    exported = read_state_dict(trained_run / "model" / "model.safetensors")
    trained = read_state_dict(ckpt.step_dir(trained_run, 4) / "model.safetensors")
    assert all(torch.equal(exported[key], value) for key, value in trained.items() if key in exported)
    assert not (trained_run / ".model.old").exists() and not (trained_run / ".model.tmp").exists()


# ---- a full disk -------------------------------------------------------------------------------------------


def disk_full_at(monkeypatch, module, name: str, where: str) -> None:
    """Writes through `module.name` whose path contains `where` write half their bytes, then hit ENOSPC."""
    original = getattr(module, name)

    def full(*args, **kwargs):
        path = str(args[1] if len(args) > 1 else kwargs.get("filename", kwargs.get("path")))
        if where not in path:
            return original(*args, **kwargs)
        original(*args, **kwargs)
        written = Path(path) if Path(path).exists() else Path(path).with_name(f".{Path(path).name}.tmp")
        if written.exists():
            with open(written, "r+b") as handle:
                handle.truncate(written.stat().st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(module, name, full)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(trained_run, tiny_base, monkeypatch, capsys):
    import cpt.common.weights

    kept = tree(trained_run / "checkpoints")
    best_before = (trained_run / "best.json").read_bytes()
    env = train_env(trained_run, tiny_base, max_steps=6)
    with monkeypatch.context() as patch:
        disk_full_at(patch, cpt.common.weights, "save_file", "step-00000006.tmp")
        code, stderr = run_main(["train"], env, patch, capsys)

    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("cpt: ") and "no space left" in lines[-1].lower() and "Traceback" not in stderr
    assert {k: v for k, v in tree(trained_run / "checkpoints").items() if not k.startswith("step-00000006")} == kept
    assert latest_valid(trained_run) == "step-00000004" and not ckpt.step_dir(trained_run, 6).exists()
    assert (trained_run / "best.json").read_bytes() == best_before

    again = invoke(["train"], env)  # space freed: the same command resumes
    assert again.exit_code == 0, again.stderr
    assert "step-00000004(step4)" in squash(again.stderr) and latest_valid(trained_run) == "step-00000006"
    assert not list((trained_run / "checkpoints").glob("*.tmp"))


def test_disk_full_while_exporting_keeps_the_previous_export(trained_run, tiny_base, monkeypatch, capsys):
    import cpt.common.weights

    env = train_env(trained_run, tiny_base)
    first = invoke(["export", "--checkpoint", "step-00000002"], env)
    assert first.exit_code == 0, first.stderr
    exported, record = tree(trained_run / "model"), (trained_run / "export.json").read_bytes()
    with monkeypatch.context() as patch:
        disk_full_at(patch, cpt.common.weights, "save_file", ".model.tmp")
        code, stderr = run_main(["export"], env, patch, capsys)

    assert code != 0 and "no space left" in stderr.lower() and "Traceback" not in stderr
    assert tree(trained_run / "model") == exported, "the previous export must stay whole"
    assert (trained_run / "export.json").read_bytes() == record


def test_disk_full_is_a_clear_one_line_error(trained_run, tiny_base, monkeypatch, capsys):
    import cpt.common.weights

    disk_full_at(monkeypatch, cpt.common.weights, "save_file", ".model.tmp")
    code, stderr = run_main(["export"], train_env(trained_run, tiny_base), monkeypatch, capsys)
    line = [line for line in stderr.splitlines() if line.strip()][-1]
    assert code == 3 and line.startswith("cpt: error:"), stderr
    assert "no space left" in line.lower() and "free" in line.lower()
