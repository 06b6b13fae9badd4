"""The run report: report.md and curves.png from a real (tiny) run, `cpt report`, TensorBoard when importable."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
from conftest import prepare_and_tokenize
from typer.testing import CliRunner

from cpt.cli import app
from cpt.config import ExportConfig, TrainConfig
from cpt.errors import BadInput
from cpt.export.export import export_model
from cpt.tools.report import read_metrics, write_report, write_tensorboard
from cpt.training.loop import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tiny_base_template, tmp_path_factory) -> Path:
    from conftest import SAMPLE_CORPUS

    root = tmp_path_factory.mktemp("report")
    base = root / "base"
    shutil.copytree(tiny_base_template, base)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    run_dir = root / "run"
    prepare_and_tokenize(run_dir, corpus, base)
    train(TrainConfig(output=run_dir, base_model=base, micro_batch_size=4, global_batch_size=4, max_steps=6, lr=3e-3,
                      warmup_steps=1, eval_interval=2, save_interval=3, eval_max_sequences=8))
    export_model(ExportConfig(output=run_dir, base_model=base, format="safetensors"))
    return run_dir


def test_report_and_curves_are_written(finished_run):
    path = write_report(finished_run)
    assert path == finished_run / "report.md"
    text = path.read_text(encoding="utf-8")
    metrics = read_metrics(finished_run)
    best = json.loads((finished_run / "best.json").read_text())
    base_entry = metrics[0]
    assert base_entry["step"] == 0
    assert f"| base model (step 0) | 0 | {base_entry['val_mlm_loss']:.4f} | {base_entry['val_mlm_acc']:.4f} |" in text
    best_entry = next(m for m in metrics if m["step"] == best["step"])
    assert f"| {best['step']} | {best_entry['val_mlm_loss']:.4f} |" in text
    assert str(finished_run / "model") in text and "curves.png" in text
    # a random base: the step-0 check finds its head untrained and the run warms it up (auto: 1 of 6 steps)
    for fragment in ("train shards:", "tokens/s", "masking `wwm+span`", "max_seq_length `64`", "wall time",
                     "checked at step 0: **untrained** (val loss", "head warm-up: steps 1-1 (of up to 1; its cap)"):
        assert fragment in text, fragment
    assert (finished_run / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert not [p for p in finished_run.iterdir() if p.name.endswith(".tmp")], "atomic writes leave no temp file"


def test_settings_come_from_the_newest_checkpoint(finished_run):
    """report.md shows every train setting, read from the full config the newest checkpoint recorded."""
    from cpt import __version__
    from cpt.training import checkpoint as ckpt

    record = ckpt.read_checkpoint_record(ckpt.latest_valid_checkpoint(finished_run))["run"]
    assert record["config"]["max_steps"] == 6 and record["cpt_version"] == __version__
    text = write_report(finished_run).read_text(encoding="utf-8")
    train_line = next(line for line in text.splitlines() if line.startswith("- train: "))
    for fragment in ("max_steps `6`", "lr `0.003`", "eval_interval `2`", "save_interval `3`", "masking `wwm+span`",
                     f"output `{finished_run}`"):
        assert fragment in train_line, fragment
    assert f"trained with cpt {__version__}" in text


def test_settings_of_checkpoints_from_before_the_full_config(finished_run, tmp_path):
    """A run whose checkpoints hold only the few settings recorded before: those, and the logged peak lr."""
    from cpt.training import checkpoint as ckpt

    run_dir = tmp_path / "older"
    shutil.copytree(finished_run, run_dir)
    for _step, path in ckpt.valid_checkpoints(run_dir):
        record = json.loads((path / "state.json").read_text())
        config = record["run"].pop("config")
        record["run"].pop("cpt_version")
        record["run"].update({key: config[key] for key in ("global_batch_size", "masking", "mask_prob", "seed")})
        (path / "state.json").write_text(json.dumps(record))
    text = write_report(run_dir).read_text(encoding="utf-8")
    train_line = next(line for line in text.splitlines() if line.startswith("- train: "))
    assert "masking `wwm+span`" in train_line and "peak lr (logged) `0.003`" in train_line
    assert "max_steps" not in train_line and "trained with cpt" not in text


def test_cli_regenerates(finished_run):
    (finished_run / "report.md").unlink(missing_ok=True)
    (finished_run / "curves.png").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(finished_run)])
    assert result.exit_code == 0, result.output
    assert (finished_run / "report.md").is_file() and (finished_run / "curves.png").stat().st_size > 10_000


def test_run_without_metrics_exits_3_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "metrics.jsonl is missing" in lines[0]
    with pytest.raises(BadInput, match="no such run directory"):
        write_report(tmp_path / "absent")


def test_metrics_of_an_interrupted_step_are_merged(tmp_path):
    lines = [{"step": 0, "val_mlm_loss": 9.0, "val_mlm_acc": 0.0}, {"step": 2, "loss": 8.0, "lr": 1e-3},
             {"step": 2, "tokens_seen": 100, "val_mlm_loss": 7.5, "val_mlm_acc": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n{\"step\": 3, \"lo")
    merged = read_metrics(tmp_path)
    assert [m["step"] for m in merged] == [0, 2] and merged[1]["loss"] == 8.0 and merged[1]["val_mlm_acc"] == 0.1
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "not exported yet" in text and "corpus/manifest.json: not found" in text


def test_tensorboard_events_when_importable(tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = Path(log_dir)
            self.log_dir.mkdir(parents=True, exist_ok=True)  # as SummaryWriter: the dir may exist

        def add_scalar(self, tag, value, global_step):
            written.append((tag, value, global_step))

        def close(self):
            (self.log_dir / "events.out.tfevents.fake").write_text(json.dumps(written))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    metrics = [{"step": 0, "val_mlm_loss": 9.0, "val_mlm_acc": 0.0}, {"step": 5, "loss": 8.0, "lr": 1e-3}]
    directory = write_tensorboard(metrics, tmp_path / "tensorboard")
    assert directory == tmp_path / "tensorboard" and (directory / "events.out.tfevents.fake").is_file()
    assert ("val/mlm_loss", 9.0, 0) in written and ("train/loss", 8.0, 5) in written
    write_tensorboard(metrics, tmp_path / "tensorboard")  # rewrites in place, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensorboard"]


def test_tensorboard_absent_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    assert write_tensorboard([{"step": 0, "val_mlm_loss": 1.0}], tmp_path / "tensorboard") is None
    assert not (tmp_path / "tensorboard").exists()
