"""`cpt plan`, the epoch guard, the disk check, --max-time and --micro-batch-size auto."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest

from cpt.config import TrainConfig, parse_duration_s
from cpt.errors import BadInput
from cpt.pipeline import run_pipeline
from cpt.tools.plan import plan_run
from cpt.training import checkpoint as ckpt
from cpt.training.autobatch import cpu_micro_batch_size, divisors_descending
from cpt.training.loop import train


def run_values(tmp_path: Path, base: Path, corpus: Path, **overrides) -> dict:
    values = {"corpus": (str(corpus),), "base_model": base, "output": tmp_path / "run", "max_seq_length": 64,
              "micro_batch_size": "4", "global_batch_size": 8, "max_steps": 6, "eval_interval": 3, "save_interval": 3,
              "eval_max_sequences": 8, "workers": 1, "val_fraction": 0.1, "lr": 1e-3}
    values.update(overrides)
    return values


def test_plan_numbers_match_a_hand_computation(tmp_path, tiny_base, small_corpus, capsys):
    plan = plan_run(run_values(tmp_path, tiny_base, small_corpus, max_steps=1000), as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == plan["epochs"]
    shards = json.loads((tmp_path / "run" / "shards" / "manifest.json").read_text())["splits"]["train"]
    assert plan["corpus"]["train_sequences"] == shards["sequences"]
    assert plan["epochs"] == pytest.approx(1000 * 8 / shards["sequences"], abs=0.01)
    assert plan["tokens_per_step"] == round(8 * shards["tokens"] / shards["sequences"])
    probe = plan["probe"]
    # a random base: its head is untrained, so up to 100 of the 1000 steps (10 %) are head warm-up steps
    head = probe["head_warmup"]
    assert plan["head_untrained"] is True and plan["head_warmup_steps"] == 100
    assert 0 < head["seconds_per_step"]
    assert plan["estimated_train_seconds"] == round(probe["seconds_per_step"] * 900 + head["seconds_per_step"] * 100)
    assert probe["probe_steps"] == 4 and probe["seconds_per_step"] > 0
    assert plan["epoch_warning"] is (plan["epochs"] > 40)
    assert not ckpt.step_dirs(tmp_path / "run"), "plan never trains for real"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_plan_without_head_warm_up_counts_whole_model_steps_only(tmp_path, tiny_base, small_corpus, capsys):
    plan = plan_run(run_values(tmp_path, tiny_base, small_corpus, max_steps=1000, head_warmup="off"), as_json=True)
    assert plan["head_warmup_steps"] == 0 and plan["head_untrained"] is True
    assert plan["estimated_train_seconds"] == round(plan["probe"]["seconds_per_step"] * 1000)
    plan_run(run_values(tmp_path, tiny_base, small_corpus, max_steps=1000, head_warmup="off"))
    assert "untrained: no head warm-up" in " ".join(capsys.readouterr().out.split())


def test_epoch_warning_names_the_numbers(tmp_path, tiny_base, small_corpus, capsys):
    run_pipeline(run_values(tmp_path, tiny_base, small_corpus, max_steps=2, save_interval=2, max_epochs=0.01))
    err = capsys.readouterr().err
    assert "epochs" in err and "--max-epochs 0.01" in err


def test_not_enough_disk_is_refused_before_training(tmp_path, tiny_base, small_corpus, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(BadInput, match="GiB free"):
        run_pipeline(run_values(tmp_path, tiny_base, small_corpus))
    assert not ckpt.step_dirs(tmp_path / "run")


def test_max_time_stops_early_and_still_exports(tmp_path, tiny_base, small_corpus):
    model_dir = run_pipeline(run_values(tmp_path, tiny_base, small_corpus, max_steps=100000, save_interval=100000,
                                        eval_interval=100000, max_time="12s"))
    assert (model_dir / "model.safetensors").exists()
    steps = [step for step, _ in ckpt.valid_checkpoints(tmp_path / "run")]
    assert steps and 0 < steps[-1] < 100000


def test_auto_micro_batch_on_cpu_trains(tmp_path, tiny_base, small_corpus):
    values = run_values(tmp_path, tiny_base, small_corpus, micro_batch_size="auto", global_batch_size=24,
                        max_steps=2, save_interval=2)
    run_pipeline(values)
    assert cpu_micro_batch_size(24) == 12
    assert ckpt.valid_checkpoints(tmp_path / "run")[-1][0] == 2


def test_micro_batch_helpers_and_durations():
    assert divisors_descending(12) == [12, 6, 4, 3, 2, 1]
    assert cpu_micro_batch_size(32) == 16 and cpu_micro_batch_size(7) == 7 and cpu_micro_batch_size(17) == 1
    assert parse_duration_s("1d12h") == 129600 and parse_duration_s("90m") == 5400 and parse_duration_s("") == 0
    assert parse_duration_s("soon") is None and parse_duration_s("-3") is None
    config = TrainConfig(output=Path("x"), base_model=Path("y"), micro_batch_size="many", max_time="later")
    message = "; ".join(config.problems())
    assert "--micro-batch-size" in message and "--max-time" in message


def test_resume_refuses_other_micro_batch_free(tmp_path, tiny_base, small_corpus):
    """Changing only the micro-batch size (same global batch) is allowed on resume."""
    values = run_values(tmp_path, tiny_base, small_corpus, max_steps=2, save_interval=2)
    run_pipeline(values)
    config = TrainConfig(output=tmp_path / "run", base_model=tiny_base, micro_batch_size="8", global_batch_size=8,
                         max_steps=4, save_interval=2, eval_interval=2, eval_max_sequences=8, lr=1e-3)
    train(config)
    assert ckpt.valid_checkpoints(tmp_path / "run")[-1][0] == 4
