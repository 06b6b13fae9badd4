"""Training loop: exact resume, masked-only head == full head, checkpoints, best pointer, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_bit_identical, final_weights, prepare_and_tokenize

from cpt.common.weights import read_state_dict
from cpt.config import TrainConfig
from cpt.errors import BadInput
from cpt.training import checkpoint as ckpt
from cpt.training.loop import train
from cpt.training.model import load_mlm_model, masked_lm_logits


@pytest.fixture
def tokenized_run(tmp_path, tiny_base, small_corpus) -> Path:
    run_dir = tmp_path / "run"
    prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    return run_dir


def train_config(run_dir: Path, base: Path, **overrides) -> TrainConfig:
    settings = dict(output=run_dir, base_model=base, micro_batch_size=4, global_batch_size=8, max_steps=6,
                    lr=1e-3, warmup_steps=2, eval_interval=3, save_interval=2, eval_max_sequences=16,
                    keep_checkpoints=2, seed=7)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_resume_after_interrupt_is_bit_identical(tokenized_run, tiny_base, tmp_path, monkeypatch):
    other = tmp_path / "other"
    assert_resume_is_bit_identical(tokenized_run, other, lambda run: train_config(run, tiny_base), monkeypatch, 6)
    steps = [json.loads(line)["step"] for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics.jsonl must not repeat steps after a resume"


@pytest.mark.parametrize("unpad", ["off", "on"])
def test_loader_built_metadata_reaches_the_step_and_changes_no_weight(tokenized_run, tiny_base, tmp_path, monkeypatch,
                                                                     unpad):
    """Training batches carry the loader's unpadding metadata (the CUDA step's sync-free path); the weights are
    bit-identical to a run whose step finds the masked rows itself, padded and unpadded."""
    from cpt.training.model import MaskedLMObjective
    from cpt.training.unpadded import METADATA_KEYS

    other = tmp_path / "without-metadata"
    shutil.copytree(tokenized_run, other)
    seen: list[set] = []
    forward = MaskedLMObjective.forward

    def recording(self, input_ids, attention_mask, labels, **metadata):
        seen.append(set(metadata))
        return forward(self, input_ids, attention_mask, labels, **metadata)

    with monkeypatch.context() as patch:
        patch.setattr(MaskedLMObjective, "forward", recording)
        train(train_config(tokenized_run, tiny_base, max_steps=4, save_interval=4, unpad=unpad, loader_workers=1))
    # 4 steps x 2 micro-batches carry it; evaluation batches (built by evaluate_mlm) do not
    assert sum(keys == set(METADATA_KEYS) for keys in seen) == 8 and all(keys in (set(), set(METADATA_KEYS))
                                                                          for keys in seen), seen
    monkeypatch.setattr("cpt.training.session.LOADER_BUILDS_METADATA", False)
    train(train_config(other, tiny_base, max_steps=4, save_interval=4, unpad=unpad, loader_workers=1))
    want, got = final_weights(other, 4), final_weights(tokenized_run, 4)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_checkpoints_best_and_retention(tokenized_run, tiny_base):
    best = train(train_config(tokenized_run, tiny_base, max_steps=8, save_interval=2, keep_checkpoints=2))
    kept = [step for step, _ in ckpt.valid_checkpoints(tokenized_run)]
    assert kept[-2:] == [6, 8]
    assert best["step"] in kept, "the best checkpoint is never pruned"
    assert set(kept) <= {best["step"], 6, 8}
    metrics = [json.loads(line) for line in (tokenized_run / "metrics.jsonl").read_text().splitlines()]
    evaluated = {m["step"]: m["val_mlm_acc"] for m in metrics if "val_mlm_acc" in m}
    assert 0 in evaluated, "the base model is evaluated at step 0"
    saved_steps = [2, 4, 6, 8]
    assert best["value"] == max(evaluated[s] for s in saved_steps)
    assert not list(ckpt.checkpoints_dir(tokenized_run).glob("*.tmp"))


def test_corrupt_newest_checkpoint_falls_back(tokenized_run, tiny_base, capsys):
    train(train_config(tokenized_run, tiny_base, max_steps=4, save_interval=2))
    newest = ckpt.step_dir(tokenized_run, 4)
    with open(newest / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    assert ckpt.latest_valid_checkpoint(tokenized_run) == ckpt.step_dir(tokenized_run, 2)
    assert "falling back" in capsys.readouterr().err
    assert newest.exists(), "an invalid checkpoint is reported, never deleted"


def test_masked_only_head_matches_full_head(tiny_base):
    model = load_mlm_model(tiny_base).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 5000, (3, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 15:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 3], labels[1, 7], labels[1, 8], labels[2, 14] = 11, 22, 33, 44
    with torch.no_grad():
        logits, targets = masked_lm_logits(model, input_ids, attention_mask, labels)
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.allclose(logits, full[labels != -100], atol=1e-5)
    loss = torch.nn.functional.cross_entropy(logits, targets)
    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(loss, reference, atol=1e-5)


def test_training_lowers_validation_loss(tokenized_run, tiny_base):
    train(train_config(tokenized_run, tiny_base, max_steps=20, save_interval=20, eval_interval=20, lr=2e-3))
    metrics = [json.loads(line) for line in (tokenized_run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m for m in metrics if "val_mlm_loss" in m]
    assert evaluated[-1]["val_mlm_loss"] < evaluated[0]["val_mlm_loss"] - 0.5


def test_shards_from_another_tokenizer_are_refused(tokenized_run, tiny_base):
    vocab = tiny_base / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("[unused1]", "[unusedX]"), encoding="utf-8")
    with pytest.raises(BadInput, match="another tokenizer"):
        train(train_config(tokenized_run, tiny_base))


def test_resume_with_other_settings_is_refused(tokenized_run, tiny_base):
    train(train_config(tokenized_run, tiny_base, max_steps=2))
    with pytest.raises(BadInput, match="global_batch_size"):
        train(train_config(tokenized_run, tiny_base, max_steps=4, global_batch_size=16))


def test_every_checkpoint_records_the_full_config_and_the_cpt_version(tokenized_run, tiny_base):
    from dataclasses import fields

    from cpt import __version__

    train(train_config(tokenized_run, tiny_base, max_steps=2, save_interval=2))
    record = ckpt.read_checkpoint_record(ckpt.step_dir(tokenized_run, 2))["run"]
    assert set(record["config"]) == {field.name for field in fields(TrainConfig)}
    assert record["config"]["output"] == str(tokenized_run) and record["config"]["max_steps"] == 2
    assert record["cpt_version"] == __version__


def older_run_record(checkpoint: Path) -> None:
    """Rewrite a checkpoint's run record as cpt wrote it before the full config: six settings at its top
    (head_warmup and head_warmup_lr only when not the defaults), no config, no version."""
    state_file = checkpoint / "state.json"
    record = json.loads(state_file.read_text())
    config = record["run"].pop("config")
    del record["run"]["cpt_version"]
    record["run"].update({key: config[key] for key in ("global_batch_size", "masking", "mask_prob", "seed")})
    state_file.write_text(json.dumps(record))  # state.json is not among the sized files: still valid


def test_checkpoints_from_before_the_full_config_still_resume(tokenized_run, tiny_base, tmp_path):
    """Same weights as an uninterrupted run; the settings that must match are still checked."""
    other = tmp_path / "uninterrupted"
    shutil.copytree(tokenized_run, other)
    train(train_config(tokenized_run, tiny_base, max_steps=2, save_interval=2))
    older_run_record(ckpt.step_dir(tokenized_run, 2))
    for changed, setting in (({"global_batch_size": 16}, "global_batch_size"), ({"head_warmup": "off"}, "head_warmup"),
                             ({"masking": "token"}, "masking")):
        with pytest.raises(BadInput, match=setting):
            train(train_config(tokenized_run, tiny_base, max_steps=4, save_interval=2, **changed))
    train(train_config(tokenized_run, tiny_base, max_steps=4, save_interval=2))
    train(train_config(other, tiny_base, max_steps=4, save_interval=2))
    want, got = final_weights(other, 4), final_weights(tokenized_run, 4)
    assert all(torch.equal(want[name], got[name]) for name in want)


def test_init_from_uer_starts_from_the_converted_dir(tokenized_run, tiny_base, tmp_path):
    """--init-from-uer: the train stage converts the UER file into RUN_DIR/uer-init/ (cpt.pipeline.train_stage);
    training loads its weights, and says how to convert when the dir is missing."""
    from cpt.common.weights import find_weights_file, write_state_dict
    from cpt.training.distributed import setup
    from cpt.training.model import UER_INIT_DIR
    from cpt.training.session import start_session

    uer_file = tmp_path / "model.bin-5000"
    uer_file.write_bytes(b"unused here")
    config = train_config(tokenized_run, tiny_base, init_from_uer=uer_file)
    with pytest.raises(BadInput, match=f"{UER_INIT_DIR} holds no converted model; run `cpt convert --from uer"):
        start_session(config, setup("cpu"))
    weights = read_state_dict(find_weights_file(tiny_base))
    weights["bert.encoder.layer.0.output.dense.weight"] = torch.full_like(
        weights["bert.encoder.layer.0.output.dense.weight"], 0.5)
    (tokenized_run / UER_INIT_DIR).mkdir()
    write_state_dict(weights, tokenized_run / UER_INIT_DIR / "model.safetensors")
    model = start_session(config, setup("cpu")).model
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, weights["bert.encoder.layer.0.output.dense.weight"])


def test_what_is_due_after_a_step():
    """Logs, evaluations, checkpoints and stops follow from the step number and the intervals alone."""
    from cpt.training.head_warmup import HeadPhaseState
    from cpt.training.loop import Due, due_after

    config = TrainConfig(output=Path("x"), base_model=Path("y"), max_steps=100, log_interval=2, eval_interval=4,
                         save_interval=5)

    def due(step: int, out_of_time: bool = False, head_steps: int = 0) -> Due:
        return due_after(ckpt.TrainState(step=step, head=HeadPhaseState(max_steps=head_steps)), config,
                         out_of_time=out_of_time)

    assert due(1) == Due(log=False, eval=False, head_eval=False, save=False, out_of_time=False, last=False)
    assert due(2) == Due(log=True, eval=False, head_eval=False, save=False, out_of_time=False, last=False)
    assert due(4) == Due(log=True, eval=True, head_eval=False, save=False, out_of_time=False, last=False)
    assert due(5) == Due(log=True, eval=True, head_eval=False, save=True, out_of_time=False, last=False)
    assert due(3, out_of_time=True) == Due(log=True, eval=True, head_eval=False, save=True, out_of_time=True, last=False)
    assert due(100, out_of_time=True) == Due(log=True, eval=True, head_eval=False, save=True, out_of_time=False,
                                             last=True)
    # A head phase capped at 25 steps evaluates every 2 (25 // 10), and at its cap.
    assert [step for step in range(1, 26) if due(step, head_steps=25).head_eval] == [2, 4, 6, 8, 10, 12, 14, 16, 18,
                                                                                      20, 22, 24, 25]
    assert due(2, head_steps=25).eval and not due(2).head_eval


def test_batch_sizes_that_do_not_divide_are_reported():
    problems = TrainConfig(output=Path("x"), base_model=Path("y"), micro_batch_size=3, global_batch_size=8).problems()
    assert any("multiple of --micro-batch-size" in problem for problem in problems)


def test_a_non_finite_loss_stops_training_naming_its_step_and_saves_nothing_after_it(tokenized_run, tiny_base,
                                                                                       monkeypatch):
    from cpt.training import loop as train_module
    from cpt.training.step import StepSums

    real_train_step = train_module.train_step

    def train_step_diverging_at_step_3(session, state, prepared, phase=None):
        sums, sampler = real_train_step(session, state, prepared, phase)
        if state.step == 2:  # the third step (steps count from 1 in logs and checkpoints)
            sums = StepSums(torch.tensor([float("nan"), 0.0, 1.0, 1.0], dtype=torch.float64), sums.lr)
        return sums, sampler

    monkeypatch.setattr(train_module, "train_step", train_step_diverging_at_step_3)
    with pytest.raises(BadInput, match="diverged at step 3 "):
        train(train_config(tokenized_run, tiny_base, max_steps=6, save_interval=2, eval_interval=6, log_interval=5))
    saved = sorted(path.name for path in ckpt.checkpoints_dir(tokenized_run).iterdir())
    assert saved == ["step-00000002"], saved


def test_every_bad_setting_reported_at_once():
    config = TrainConfig(output=Path("x"), base_model=Path("y"), max_steps=0, lr=float("nan"), masking="bogus")
    message = "; ".join(config.problems())
    assert "--max-steps" in message and "--lr" in message and "--masking" in message


def test_background_batch_building_changes_nothing(tokenized_run, tiny_base, tmp_path):
    other = tmp_path / "prefetched"
    shutil.copytree(tokenized_run, other)
    train(train_config(tokenized_run, tiny_base, max_steps=4, save_interval=4, loader_workers=0))
    train(train_config(other, tiny_base, max_steps=4, save_interval=4, loader_workers=2))
    want, got = final_weights(tokenized_run, 4), final_weights(other, 4)
    assert all(torch.equal(want[name], got[name]) for name in want)
    for run_dir in (tokenized_run, other):
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        shares = [entry["data_wait_share"] for entry in logged if "loss" in entry]
        assert shares and all(0 <= share <= 1 for share in shares), shares


def test_best_prefers_higher_acc_then_lower_loss():
    from cpt.training.resume import is_better

    best = {"value": 0.30, "val_mlm_loss": 4.0}
    assert is_better("val_mlm_acc", {"val_mlm_acc": 0.31, "val_mlm_loss": 9.0}, best)
    assert is_better("val_mlm_acc", {"val_mlm_acc": 0.30, "val_mlm_loss": 3.9}, best)
    assert not is_better("val_mlm_acc", {"val_mlm_acc": 0.30, "val_mlm_loss": 4.1}, best)
    assert not is_better("val_mlm_acc", {"val_mlm_acc": float("nan"), "val_mlm_loss": 1.0}, best)
    assert is_better("val_mlm_loss", {"val_mlm_acc": 0.1, "val_mlm_loss": 3.0}, {"value": 3.5})


def test_bf16_autocast_on_cpu_when_asked_or_native(tokenized_run, tiny_base, monkeypatch):
    from cpt.training import session as session_module
    from cpt.training.session import autocast_for

    assert autocast_for(torch.device("cpu"), "bf16")[1] == "bf16"
    assert autocast_for(torch.device("cpu"), "fp32")[1] == "fp32"
    assert autocast_for(torch.device("cpu"), "fp16")[1] == "fp32"  # fp16 autocast is CUDA only
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(session_module, "cpu_has_native_bf16", lambda native=native: native)
        assert autocast_for(torch.device("cpu"), "auto")[1] == expected
    train(train_config(tokenized_run, tiny_base, max_steps=2, save_interval=2, precision="bf16"))
    metrics = [json.loads(line) for line in (tokenized_run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["val_mlm_loss"] == m["val_mlm_loss"] for m in metrics if "val_mlm_loss" in m)  # not NaN


def test_batch_widths_are_rounded_to_a_few_shapes(tokenized_run, tiny_base):
    """Training batches pad to a multiple of 16 (never past the shards' max length): oneDNN keeps
    compiled kernels per shape, and bf16 training with every width from 20 to 128 held 1.2 GB."""
    from cpt.common.base_model import load_tokenizer
    from cpt.data.shards import ShardSet
    from cpt.training.batches import batch_width, build_batch, masking_spec_for

    assert [batch_width(n, 64) for n in (1, 16, 17, 50, 63, 64)] == [16, 16, 32, 64, 64, 64]
    assert batch_width(50, 60) == 60 and batch_width(61, 60) == 61  # capped, never shorter than the longest
    assert batch_width(50, None) == 50
    shards = ShardSet(tokenized_run / "shards", "train")
    picks = [(0, index) for index in sorted(range(len(shards)), key=shards.length)[:4]]  # short ones: padding added
    spec = masking_spec_for(load_tokenizer(tiny_base), "wwm+span", 0.15, 0.2, 10)
    exact = build_batch(shards, picks, spec, seed=1)
    rounded = build_batch(shards, picks, spec, seed=1, max_width=64)
    assert rounded["input_ids"].shape[1] == batch_width(exact["input_ids"].shape[1], 64)
    width = exact["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(rounded[key][:, :width], exact[key])  # the same masks; only padding added
    assert not rounded["attention_mask"][:, width:].any() and (rounded["labels"][:, width:] == -100).all()


def test_prediction_head_sees_a_multiple_of_64_rows(tiny_base):
    """The number of masked positions changes every step; the head runs on them padded with zero rows
    (sliced off again), so oneDNN compiles a few shapes instead of one per step."""
    from cpt.training.model import HEAD_ROWS_MULTIPLE, masked_lm_loss

    model = load_mlm_model(tiny_base)
    seen = []
    model.cls.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].shape[0]))
    input_ids = torch.randint(1000, 8000, (2, 30))
    labels = torch.full_like(input_ids, -100)
    labels[0, :7] = input_ids[0, :7]
    _loss, _correct, count = masked_lm_loss(model, input_ids, torch.ones_like(input_ids), labels)
    assert int(count) == 7 and seen == [HEAD_ROWS_MULTIPLE]

