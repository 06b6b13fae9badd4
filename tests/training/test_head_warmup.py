"""The MLM head check and the head warm-up phase, on a small BERT really pretrained on the sample.

One session fixture pretrains a tiny BERT (so its head is trained), then derives two bases whose head is
random like hfl/chinese-roberta-wwm-ext-large's: the model's own init, and large-scale noise. The tests
show: the check fires on both and not on the trained head; the head phase leaves every encoder and
embedding tensor bit-identical; with the same total steps the warm-up run ends with the lower val loss
(and a probe at least as good); a kill -9 inside the head phase resumes to the identical result; the
export carries the trained head.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_CORPUS, run_main

from cpt.common.weights import read_state_dict, write_state_dict
from cpt.config import ExportConfig, TrainConfig
from cpt.export.export import export_model
from cpt.pipeline import run_pipeline
from cpt.training import checkpoint as ckpt
from cpt.training.head_warmup import head_parameters, judge_head, planned_head_steps, reinit_head
from cpt.training.loop import train
from cpt.training.model import load_mlm_model

pytestmark = pytest.mark.slow

STEPS = 40  # total optimizer steps of the compared runs (auto head phase: up to 4 of them)
COMMON = {"max_seq_length": 64, "micro_batch_size": "16", "global_batch_size": 16, "val_fraction": 0.05,
          "device": "cpu", "workers": 1, "seed": 1}


def _write_base(source: Path, target: Path, change) -> Path:
    """A copy of the HF dir `source` whose weights went through `change(model)`."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model = load_mlm_model(source)
    change(model)
    write_state_dict({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
                     target / "model.safetensors")
    return target


def _noise(model) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in head_parameters(model).values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 3.0)


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    """healthy: a tiny BERT pretrained 200 steps on the sample; reinit / noise: the same with a random head."""
    from cpt.training.model import init_base

    root = tmp_path_factory.mktemp("head")
    init_base(root / "random", preset="tiny", seed=0, max_position_embeddings=128)
    run_pipeline({**COMMON, "corpus": (str(SAMPLE_CORPUS),), "base_model": root / "random", "output": root / "pre",
                  "max_steps": 200, "lr": 3e-3, "warmup_steps": 20, "eval_interval": 200, "save_interval": 200,
                  "head_warmup": "off", "eval_max_sequences": 64})
    healthy = root / "pre" / "model"
    return {"healthy": healthy, "reinit": _write_base(healthy, root / "reinit", lambda m: reinit_head(m, 123)),
            "noise": _write_base(healthy, root / "noise", _noise), "template": root / "pre"}


def _run_dir(bases: dict, path: Path) -> Path:
    path.mkdir(parents=True)
    for part in ("corpus", "shards"):
        shutil.copytree(bases["template"] / part, path / part)
    return path


def _config(run_dir: Path, base: Path, **overrides) -> TrainConfig:
    settings = dict(output=run_dir, base_model=base, max_steps=STEPS, lr=2e-4, warmup_steps=2,
                    micro_batch_size="16", global_batch_size=16, eval_interval=STEPS, save_interval=STEPS,
                    eval_max_sequences=64, device="cpu", seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def compared_runs(bases, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(base, head_warmup) -> run dir, each STEPS steps with the same data, masks and seed."""
    root = tmp_path_factory.mktemp("compared")
    runs = {}
    for base, setting in (("healthy", "auto"), ("reinit", "auto"), ("reinit", "off"), ("noise", "auto"),
                          ("noise", "off")):
        run_dir = _run_dir(bases, root / f"{base}-{setting}")
        train(_config(run_dir, bases[base], head_warmup=setting))
        runs[base, setting] = run_dir
    return runs


def test_the_check_fires_on_random_heads_and_not_on_a_trained_one(compared_runs):
    checks = {key: json.loads((run / "head_check.json").read_text()) for key, run in compared_runs.items()}
    assert not checks["healthy", "auto"]["untrained"], checks["healthy", "auto"]
    assert checks["healthy", "auto"]["head_warmup_max_steps"] == 0
    for base in ("reinit", "noise"):
        assert checks[base, "auto"]["untrained"] and checks[base, "off"]["untrained"], checks[base, "auto"]
        assert checks[base, "auto"]["head_warmup_max_steps"] == planned_head_steps("auto", True, STEPS) == 4
        assert checks[base, "off"]["head_warmup_max_steps"] == 0
    # the noisy head is far worse than a fresh one: it is replaced by the model's own init first
    assert checks["noise", "auto"]["reinitialised"] and checks["noise", "auto"]["stored_val_loss"] > math.log(21128)
    step0 = _metrics(compared_runs["reinit", "auto"])[0]
    assert step0["step"] == 0 and step0["head_untrained"] is True and step0["head_warmup_max_steps"] == 4


def test_judge_head_thresholds():
    uniform = math.log(21128)
    assert judge_head(2.1, 10.3, uniform, 6.8)[0] is False  # a real pretrained head
    assert judge_head(6.81, 9.3, uniform, 6.79)[0] is False  # a briefly trained tiny one (at the unigram level)
    assert judge_head(9.0, 9.3, uniform, 6.8)[0] is True  # no better than a fresh head
    # a random head that beat the fresh one drawn (seen: 9.35 vs 11.97), far above the unigram baseline
    assert judge_head(9.35, 11.97, uniform, 6.8)[0] is True
    assert judge_head(250.0, 10.0, uniform, 6.8)[0] is True  # hfl large: loss in the hundreds
    assert judge_head(math.inf, 10.0, uniform, 6.8)[0] is True
    # no val data (--val-fraction 0): nothing to judge by, so no head phase under auto
    assert judge_head(math.nan, math.nan, uniform, 6.8) == (False, "not checked: the val split is empty "
                                                                  "(--val-fraction / --max-val-docs 0)")


def test_without_val_data_only_the_cap_ends_the_head_phase():
    from cpt.training.head_warmup import HeadPhaseState, after_head_eval

    state = HeadPhaseState(max_steps=4)
    assert [after_head_eval(state, step, math.nan) for step in (1, 2, 3, 4)] == [False, False, False, True]
    assert state.end_step == 4 and state.best_val_loss is None


def test_records_from_before_the_head_phase_resume_with_its_defaults_only(tmp_path):
    """Checkpoints written before the head phase existed name no head_warmup setting: they were trained
    without one, which is what the defaults do for a trained head."""
    from cpt.training.resume import resume_settings, run_record

    manifest = {"splits": {"train": {"fingerprint": "t"}, "val": {"fingerprint": "v"}}, "tokenizer_sha256": "x"}
    older = {"shards": {"train": "t", "val": "v"}, "tokenizer_sha256": "x", "global_batch_size": 32,
             "masking": "wwm+span", "mask_prob": 0.15, "seed": 42}
    default = run_record(TrainConfig(output=tmp_path, base_model=tmp_path), manifest)
    assert resume_settings(older) == resume_settings(default)
    other = run_record(TrainConfig(output=tmp_path, base_model=tmp_path, head_warmup="off", head_warmup_lr=3e-4), manifest)
    assert resume_settings(other)["head_warmup"] == "off" and resume_settings(other)["head_warmup_lr"] == 3e-4
    assert resume_settings(older) != resume_settings(other)


def test_only_the_head_phase_own_evaluations_end_it(bases, tmp_path):
    """Evaluations of --eval-interval (and --save-interval, --max-time) are logged but do not end the phase:
    its end step is the same whatever --eval-interval is."""
    ends = []
    for eval_interval in (3, 1000):
        run_dir = _run_dir(bases, tmp_path / f"every-{eval_interval}")
        train(_config(run_dir, bases["noise"], head_warmup="20", max_steps=24, eval_interval=eval_interval,
                      save_interval=24, eval_max_sequences=32))
        metrics = _metrics(run_dir)
        ends.append(next(m["step"] for m in metrics if m.get("head_warmup_done")))
        if eval_interval == 3:
            assert any(m["step"] % 3 == 0 and m.get("phase") == "head" and "val_mlm_loss" in m for m in metrics)
    assert ends[0] == ends[1] and (ends[0] % 2 == 0 or ends[0] == 20), ends  # head evals every 20 // 10 steps


def test_unigram_baseline_is_the_cross_entropy_of_train_frequencies_on_val(bases):
    import numpy as np

    from cpt.data.shards import ShardSet
    from cpt.training.head_warmup import unigram_loss

    shards = bases["template"] / "shards"
    train, val = ShardSet(shards, "train"), ShardSet(shards, "val")
    specials = np.array([0, 100, 101, 102, 103])
    counts = np.zeros(21128)
    for index in range(len(train)):
        counts += np.bincount(train.sequence(index)[0], minlength=21128)
    counts[specials] = 0
    probabilities = (counts + 0.5) / (counts.sum() + 0.5 * 21128)
    val_ids = np.concatenate([val.sequence(index)[0] for index in range(len(val))])
    val_ids = val_ids[~np.isin(val_ids, specials)]
    expected = -np.log(probabilities[val_ids]).mean()
    assert unigram_loss(train, val, 21128, specials) == pytest.approx(expected, rel=1e-9)
    assert 5.0 < expected < math.log(21128)


def test_with_the_same_total_steps_warm_up_ends_with_the_lower_val_loss(compared_runs):
    final = {key: _metrics(run)[-1] for key, run in compared_runs.items()}
    for base in ("reinit", "noise"):
        assert final[base, "auto"]["step"] == final[base, "off"]["step"] == STEPS
        assert final[base, "auto"]["val_mlm_loss"] < final[base, "off"]["val_mlm_loss"], (base, final)
    phases = [m.get("phase") for m in _metrics(compared_runs["reinit", "auto"])]
    assert phases[0] == "base" and "head" in phases and phases[-1] == "full"
    assert any(m.get("head_warmup_done") for m in _metrics(compared_runs["reinit", "auto"]))


def test_probe_after_warm_up_is_at_least_as_good(compared_runs, bases, shared_data, tmp_path):
    from cpt.config import ProbeConfig
    from cpt.tools.probe import probe_models

    models = []
    for setting in ("auto", "off"):
        run_dir = compared_runs["reinit", setting]
        export_model(ExportConfig(output=run_dir, base_model=bases["reinit"], checkpoint="latest"))
        models.append(run_dir / "model")
    rows = (shared_data / "book_review_cls.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(rows[:400]) + "\n", encoding="utf-8")
    (tmp_path / "test.tsv").write_text("\n".join(rows[-200:]) + "\n", encoding="utf-8")
    result = probe_models(models, ProbeConfig(train=tmp_path / "train.tsv", test=tmp_path / "test.tsv", steps=60,
                                                batch_size=16, lr=1e-3, max_seq_length=64, device="cpu"))
    warm, cold = (model["accuracy"] for model in result["models"])
    assert warm >= cold - 0.02, result["models"]  # the same recipe, seed and head init for both


def test_the_head_phase_leaves_encoder_and_embeddings_bit_identical(bases, tmp_path):
    run_dir = _run_dir(bases, tmp_path / "run")
    train(_config(run_dir, bases["noise"], head_warmup="4", max_steps=6, save_interval=2, keep_checkpoints=5))
    base = read_state_dict(next(bases["noise"].glob("model.safetensors")))
    # the head's own tensors (cls.predictions.decoder.bias is the output bias under a second name); the
    # decoder weight is the word embedding matrix and must stay frozen with the rest
    head_names = {name for name in base if name.startswith("cls.predictions.") and name != "cls.predictions.decoder.weight"}
    assert {f"cls.{name}" for name in head_parameters(load_mlm_model(bases["noise"]))} <= head_names
    in_head_phase = []
    for step, path in ckpt.valid_checkpoints(run_dir):
        state = ckpt.read_checkpoint_record(path)["train_state"]
        trained = read_state_dict(path / "model.safetensors")
        frozen = [name for name in base if name not in head_names and name in trained]
        end = state["head"]["end_step"]
        if end is None or step <= end:
            in_head_phase.append(step)
            changed = [name for name in frozen if not torch.equal(trained[name], base[name])]
            assert not changed, (step, changed[:3])
            assert not torch.equal(trained["cls.predictions.transform.dense.weight"],
                                   base["cls.predictions.transform.dense.weight"])
        else:
            assert not torch.equal(trained["bert.encoder.layer.0.attention.self.query.weight"],
                                   base["bert.encoder.layer.0.attention.self.query.weight"])
    assert in_head_phase and in_head_phase[0] == 2, in_head_phase


def test_export_carries_the_trained_head_and_eval_shows_it(compared_runs, bases):
    from cpt.config import EvalConfig
    from cpt.tools.eval import evaluate_models

    run_dir = compared_runs["noise", "auto"]
    model_dir = export_model(ExportConfig(output=run_dir, base_model=bases["noise"], checkpoint="latest"))
    exported = read_state_dict(model_dir / "model.safetensors")
    checkpoint = read_state_dict(ckpt.latest_valid_checkpoint(run_dir) / "model.safetensors")
    for name in ("cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight",
                 "cls.predictions.bias"):
        assert torch.equal(exported[name], checkpoint[name]), name
    result = evaluate_models([bases["noise"], model_dir], EvalConfig(corpus=(str(run_dir / "corpus" / "val.txt"),),
                                                                       max_seq_length=64, pppl_tokens=0, device="cpu"))
    base_loss, exported_loss = (model["mlm_loss"] for model in result["models"])
    assert exported_loss < base_loss - 3.0, result["models"]


def test_head_warmup_off_on_an_untrained_head_warns_and_runs_as_asked(bases, tmp_path, monkeypatch, capsys):
    run_dir = _run_dir(bases, tmp_path / "run")
    env = {"CPT_MAX_STEPS": "2", "CPT_MICRO_BATCH_SIZE": "16", "CPT_GLOBAL_BATCH_SIZE": "16", "CPT_DEVICE": "cpu",
           "CPT_EVAL_MAX_SEQUENCES": "16", "CPT_HEAD_WARMUP": "off"}
    code, stderr = run_main(["train", "--output", str(run_dir), "--base-model", str(bases["reinit"])], env,
                            monkeypatch, capsys)
    assert code == 0, stderr
    flat = " ".join(stderr.split())
    for fragment in ("MLM head check: UNTRAINED", "--head-warmup is off", "use --head-warmup auto"):
        assert fragment in flat, (fragment, flat[:600])
    assert {m.get("phase") for m in _metrics(run_dir)} == {"base", "full"}


@pytest.mark.parametrize("value", ["0", "abc", "-1", "6"])
def test_bad_head_warmup_values_are_one_line_errors(value, tiny_base, tmp_path, monkeypatch, capsys):
    code, stderr = run_main(["train", "--output", str(tmp_path / "run"), "--base-model", str(tiny_base),
                             "--max-steps", "6", "--head-warmup", value], {}, monkeypatch, capsys)
    assert code == 3 and "--head-warmup" in stderr and len(stderr.strip().splitlines()) == 1, stderr


KILL_AFTER_SAVE = r'''
import os, signal, sys
import cpt.training.checkpoint as target
original, kill_at = target.save_checkpoint, int(sys.argv[1])

def hooked(run_dir, model, optimizer, state, record):
    path = original(run_dir, model, optimizer, state, record)
    if state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after a checkpoint of the head phase
    return path
target.save_checkpoint = hooked
sys.argv = ["cpt", *sys.argv[2:]]
from cpt.cli import main
main()
'''


def test_kill_9_inside_the_head_phase_resumes_bit_identical(bases, tmp_path):
    args = ["train", "--base-model", str(bases["noise"]), "--max-steps", "10", "--head-warmup", "6",
            "--save-interval", "2", "--eval-interval", "5", "--micro-batch-size", "16", "--global-batch-size", "16",
            "--eval-max-sequences", "32", "--device", "cpu", "--seed", "1", "--lr", "2e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, killed = _run_dir(bases, tmp_path / "reference"), _run_dir(bases, tmp_path / "killed")
    subprocess.run([sys.executable, "-m", "cpt", *args, "--output", str(reference)], env=env, check=True,
                   capture_output=True)
    died = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, "2", *args, "--output", str(killed)], env=env,
                          capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    state = ckpt.read_checkpoint_record(ckpt.step_dir(killed, 2))["train_state"]
    assert state["head"]["end_step"] is None, state  # the kill came inside the head phase
    again = subprocess.run([sys.executable, "-m", "cpt", *args, "--output", str(killed)], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "head phase" in " ".join(again.stderr.split())
    expected = read_state_dict(ckpt.step_dir(reference, 10) / "model.safetensors")
    resumed = read_state_dict(ckpt.step_dir(killed, 10) / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    timing = ("tokens_per_s", "data_wait_share", "elapsed_s")
    strip = [{k: v for k, v in m.items() if k not in timing} for m in _metrics(reference)]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in _metrics(killed)]
