"""General-text replay (--replay-corpus, --replay-share): its data stages, the mix of every batch, the replay
val metrics, exact resume with replay, and the settings that are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_CORPUS, assert_two_processes_match_one, prepare_and_tokenize, run_main

from cpt.common.files import read_json
from cpt.config import PrepareConfig, TokenizeConfig, TrainConfig
from cpt.data.prepare import prepare_corpus
from cpt.data.replay import prepare_replay, replay_shards_dir, tokenize_replay
from cpt.data.tokenization import tokenize_corpus
from cpt.data.vocab import training_tokenizer
from cpt.errors import BadInput
from cpt.training import checkpoint as ckpt
from cpt.training.batches import SamplerState, StepBatching, masking_spec_for, replay_picks
from cpt.training.loop import train


@pytest.fixture
def replay_corpus(tmp_path) -> Path:
    """~80 other documents of the sample (not in small_corpus), standing in for general text."""
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[200:280]
    path = tmp_path / "general.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _prepare_and_tokenize(run_dir: Path, base: Path, corpus: Path, replay: Path, **tokenize) -> None:
    prepare = PrepareConfig(output=run_dir, corpus=(str(corpus),), replay_corpus=(str(replay),), val_fraction=0.1)
    tokenize_config = TokenizeConfig(output=run_dir, base_model=base, max_seq_length=64, workers=1, **tokenize)
    prepare_corpus(prepare)
    tokenize_corpus(tokenize_config)
    prepare_replay(prepare)
    tokenize_replay(tokenize_config)


@pytest.fixture
def replay_run(tmp_path, tiny_base, small_corpus, replay_corpus) -> Path:
    run_dir = tmp_path / "run"
    _prepare_and_tokenize(run_dir, tiny_base, small_corpus, replay_corpus)
    return run_dir


def _config(run_dir: Path, base: Path, **overrides) -> TrainConfig:
    settings = dict(output=run_dir, base_model=base, micro_batch_size=4, global_batch_size=8, max_steps=6,
                    lr=1e-3, warmup_steps=2, eval_interval=3, save_interval=2, eval_max_sequences=16,
                    keep_checkpoints=2, seed=7, replay_share=0.25, head_warmup="off")
    settings.update(overrides)
    return TrainConfig(**settings)


def _batching(run_dir: Path, base: Path, share: float, global_batch_size: int) -> StepBatching:
    manifest = read_json(run_dir / "shards" / "manifest.json")
    spec = masking_spec_for(training_tokenizer(run_dir, base, manifest), "wwm+span", 0.15, 0.2, 10)
    return StepBatching(shards_dir=run_dir / "shards", spec=spec, seed=3, global_batch_size=global_batch_size,
                        micro_batch_size=4, seq_length=64, replay_shards_dir=replay_shards_dir(run_dir),
                        replay_share=share)


def test_replay_stages_have_their_own_outputs_and_skip_when_current(replay_run, tiny_base, small_corpus,
                                                                     replay_corpus, capsys):
    root = replay_run / "replay"
    for manifest in (root / "corpus" / "manifest.json", root / "shards" / "manifest.json"):
        assert read_json(manifest) is not None
    replay_val = (root / "corpus" / "val.txt").read_text(encoding="utf-8")
    assert replay_val and replay_val not in (replay_run / "corpus" / "val.txt").read_text(encoding="utf-8")
    main = read_json(replay_run / "shards" / "manifest.json")
    replay = read_json(root / "shards" / "manifest.json")
    assert replay["tokenizer_sha256"] == main["tokenizer_sha256"]
    assert replay["splits"]["train"]["fingerprint"] != main["splits"]["train"]["fingerprint"]
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}
    capsys.readouterr()
    _prepare_and_tokenize(replay_run, tiny_base, small_corpus, replay_corpus)  # a rerun: nothing redone
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()} == written
    assert "replay/shards is up to date" in capsys.readouterr().err.replace("\n", "")


def test_replay_takes_the_extended_tokenizer_of_the_main_shards(tmp_path, tiny_base, small_corpus, replay_corpus):
    run_dir = tmp_path / "run"
    _prepare_and_tokenize(run_dir, tiny_base, small_corpus, replay_corpus, extend_vocab="auto",
                          extend_vocab_min_count=2)
    main = read_json(run_dir / "shards" / "manifest.json")
    assert main["vocab_extension"]["added_tokens"], "the sample's curly quotes should be added"
    replay = read_json(replay_shards_dir(run_dir) / "manifest.json")
    assert replay["tokenizer_sha256"] == main["tokenizer_sha256"]
    assert replay["vocab_size"] == main["vocab_size"] > read_json(tiny_base / "config.json")["vocab_size"]


@pytest.mark.parametrize("share, global_batch_size", [(0.2, 32), (0.15, 8), (0.33, 12)])
def test_replay_share_of_sequences_over_many_steps(replay_run, tiny_base, share, global_batch_size):
    batching = _batching(replay_run, tiny_base, share, global_batch_size)
    source = batching.source
    sampler, replayed, per_step = SamplerState(), 0, set()
    for _step in range(200):
        picks, sampler = batching.global_picks(sampler)
        assert len(picks) == global_batch_size
        count = sum(source.is_replay(index) for _epoch, index in picks)
        per_step.add(count)
        replayed += count
    assert abs(replayed / (200 * global_batch_size) - share) <= 0.01
    assert max(per_step) - min(per_step) <= 1  # round(share x G) or one off it, every step
    assert sampler.replay_position == replayed
    # The domain sampler advanced by the domain picks alone.
    assert sampler.epoch * source.boundary + sampler.position == 200 * global_batch_size - replayed


def test_replay_picks_are_a_pure_function_of_the_step_and_cover_each_epoch(replay_run, tiny_base):
    batching = _batching(replay_run, tiny_base, 0.25, 8)
    source = batching.source
    sampler, seen = SamplerState(), []
    for _step in range(4 * len(source.replay) // 8 + 1):  # 2 replay picks a step: past the first replay epoch
        picks, sampler = batching.global_picks(sampler)
        seen += [(epoch, index - source.boundary) for epoch, index in picks if source.is_replay(index)]
    assert seen == replay_picks(0, len(seen), num_sequences=len(source.replay), seed=3)
    first_epoch = [index for epoch, index in seen if epoch == 0]
    assert sorted(first_epoch) == list(range(len(source.replay)))  # each replay sequence once per epoch
    # A batch built from a sampler state alone equals the one built in the stream (what a resume relies on).
    state_at_7 = SamplerState()
    for _step in range(7):
        state_at_7 = batching.next_sampler(state_at_7)
    fresh = _batching(replay_run, tiny_base, 0.25, 8)
    for one, other in zip(batching.build(state_at_7)[0], fresh.build(state_at_7)[0], strict=True):
        assert all(torch.equal(one[key], other[key]) for key in one)


def _metrics(run_dir: Path) -> list[dict]:
    volatile = ("tokens_per_s", "elapsed_s", "data_wait_share")
    return [{key: value for key, value in json.loads(line).items() if key not in volatile}
            for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def test_resume_with_replay_is_bit_identical_and_both_val_metrics_are_logged(replay_run, tiny_base, tmp_path,
                                                                            monkeypatch):
    from conftest import assert_resume_is_bit_identical

    other = tmp_path / "other"
    assert_resume_is_bit_identical(replay_run, other, lambda run: _config(run, tiny_base), monkeypatch, 6)
    uninterrupted = _metrics(replay_run)
    by_step: dict[int, dict] = {}
    for entry in _metrics(other):  # the interrupted run logged step 3 twice (its log line, its checkpoint's)
        by_step.setdefault(entry["step"], {}).update(entry)
    for entry in uninterrupted:
        assert {key: by_step[entry["step"]][key] for key in entry} == entry
    evaluated = [entry for entry in uninterrupted if "val_mlm_loss" in entry]
    assert [entry["step"] for entry in evaluated] == [0, 2, 3, 4, 6]
    for entry in evaluated:
        assert entry["replay_val_mlm_loss"] > 0 and 0 <= entry["replay_val_mlm_acc"] <= 1
        assert entry["replay_val_masked_tokens"] > 0
        assert entry["replay_val_mlm_loss"] != entry["val_mlm_loss"]
    from cpt.tools.report import write_report

    write_report(replay_run)  # report.md and curves.png show the replay val loss too
    report = (replay_run / "report.md").read_text(encoding="utf-8")
    assert "replay_val_mlm_loss" in report and f"{evaluated[0]['replay_val_mlm_loss']:.4f}" in report
    assert (replay_run / "curves.png").stat().st_size > 0
    record = ckpt.read_checkpoint_record(ckpt.step_dir(replay_run, 6))["run"]
    assert record["replay_share"] == 0.25 and set(record["replay_shards"]) == {"train", "val"}
    # Another share does not resume these checkpoints.
    for share in (0.5, 0.0):
        with pytest.raises(BadInput, match="replay_share"):
            train(_config(other, tiny_base, replay_share=share, max_steps=8))


def test_without_replay_nothing_changes(replay_run, tiny_base):
    train(_config(replay_run, tiny_base, replay_share=0.0, max_steps=2, eval_interval=2))
    assert not any(key.startswith("replay_") for entry in _metrics(replay_run) for key in entry)
    assert "replay_share" not in ckpt.read_checkpoint_record(ckpt.step_dir(replay_run, 2))["run"]


@pytest.mark.parametrize("args, message", [
    (["run", "--replay-share", "0.2"], "--replay-share 0.2 needs --replay-corpus"),
    (["run", "--replay-corpus", "{corpus}"], "--replay-share is 0"),
    (["run", "--replay-corpus", "{corpus}", "--replay-share", "1.0"], "--replay-share 1.0 must be in [0, 1)"),
    (["run", "--replay-corpus", "{corpus}", "--replay-share", "-0.1"], "must be in [0, 1)"),
    (["train", "--replay-share", "0.2"], "replay/shards/manifest.json is missing"),
    (["run", "--replay-corpus", "{missing}", "--replay-share", "0.2"], "--replay-corpus {missing}: no such file"),
])
def test_bad_replay_settings_exit_3_with_one_line(args, message, tmp_path, tiny_base, small_corpus, monkeypatch,
                                                  capsys):
    run_dir = tmp_path / "run"
    if args[0] == "train":
        prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    missing = str(tmp_path / "no-such-dir")
    args = [arg.replace("{corpus}", str(small_corpus)).replace("{missing}", missing) for arg in args]
    message = message.replace("{missing}", missing)
    common = ["--output", str(run_dir), "--base-model", str(tiny_base), "--device", "cpu"]
    if args[0] == "run":
        common += ["--corpus", str(small_corpus)]
    code, stderr = run_main([*args, *common], {}, monkeypatch, capsys)
    assert code == 3, stderr
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (run_dir / "checkpoints").exists()
    assert "(or CPT_CORPUS)" not in stderr  # a replay path's error names the replay option and variable


def test_run_and_plan_do_the_replay_stages(tmp_path, tiny_base, small_corpus, replay_corpus, capsys):
    from cpt.pipeline import run_pipeline
    from cpt.tools.plan import plan_run

    values = {"corpus": (str(small_corpus),), "replay_corpus": (str(replay_corpus),), "replay_share": 0.25,
              "base_model": tiny_base, "output": tmp_path / "run", "max_seq_length": 64, "micro_batch_size": "4",
              "global_batch_size": 8, "max_steps": 2, "eval_interval": 2, "save_interval": 2,
              "eval_max_sequences": 8, "workers": 1, "val_fraction": 0.1, "lr": 1e-3, "head_warmup": "off"}
    plan = plan_run(values, as_json=True)
    replay_train = read_json(tmp_path / "run" / "replay" / "shards" / "manifest.json")["splits"]["train"]["sequences"]
    assert plan["replay"] == {"share": 0.25, "train_sequences": replay_train,
                              "val_sequences": plan["replay"]["val_sequences"],
                              "epochs": round(2 * 8 * 0.25 / replay_train, 2)}
    assert json.loads(capsys.readouterr().out)["replay"]["share"] == 0.25
    domain_train = read_json(tmp_path / "run" / "shards" / "manifest.json")["splits"]["train"]["sequences"]
    assert plan["epochs"] == round(2 * 8 * 0.75 / domain_train, 2)  # epochs over the domain text: 3/4 of each batch
    run_pipeline(values)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "replay_val_mlm_loss" in m] == [0, 2]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_two_processes_with_replay_agree_with_one(tmp_path, tiny_base, small_corpus, replay_corpus):
    """Under torchrun the replay sequences are dealt to ranks with the domain ones (by tokens), and each rank
    evaluates its share of the replay val split: 2 gloo processes end as 1 process does."""
    config = json.loads((tiny_base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout draws differ per rank
    (tiny_base / "config.json").write_text(json.dumps(config))
    single, double = tmp_path / "single", tmp_path / "double"
    _prepare_and_tokenize(single, tiny_base, small_corpus, replay_corpus)
    shutil.copytree(single, double)
    flags = ["--base-model", str(tiny_base), "--micro-batch-size", "4", "--global-batch-size", "8",
             "--max-steps", "4", "--lr", "1e-3", "--warmup-steps", "0", "--eval-interval", "2", "--save-interval", "4",
             "--eval-max-sequences", "8", "--device", "cpu", "--precision", "fp32", "--replay-share", "0.3"]
    assert_two_processes_match_one(single, double, flags, step=4)
    one, two = _metrics(single)[-1], _metrics(double)[-1]
    for key in ("val_mlm_loss", "replay_val_mlm_loss"):
        assert one[key] == pytest.approx(two[key], rel=1e-4), key
    assert one["replay_val_masked_tokens"] == two["replay_val_masked_tokens"] > 0
