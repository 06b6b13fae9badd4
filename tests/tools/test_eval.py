"""`cpt eval`: deterministic, the training validation reproduced, a trained model beats its base, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepare_and_tokenize
from typer.testing import CliRunner

from cpt.cli import app
from cpt.common.base_model import load_tokenizer
from cpt.config import EvalConfig, ExportConfig, TrainConfig
from cpt.errors import BadInput
from cpt.export.export import export_model
from cpt.tools.eval import TokenizedText, evaluate_models, pseudo_perplexity
from cpt.training.loop import train
from cpt.training.model import load_mlm_model

SEED = 7
STEPS = 24


@pytest.fixture(scope="module")
def trained(tiny_base_template, tmp_path_factory) -> dict[str, Path]:
    """A tiny base trained 24 steps on the sample news; its held-out val.txt and the exported model."""
    from conftest import SAMPLE_CORPUS

    root = tmp_path_factory.mktemp("eval")
    base = root / "base"
    shutil.copytree(tiny_base_template, base)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:60]) + "\n", encoding="utf-8")
    run_dir = root / "run"
    prepare_and_tokenize(run_dir, corpus, base, val_fraction=0.15)
    train(TrainConfig(output=run_dir, base_model=base, micro_batch_size=8, global_batch_size=8, max_steps=STEPS,
                      lr=3e-3, warmup_steps=2, eval_interval=STEPS, save_interval=STEPS, eval_max_sequences=16, seed=SEED))
    model = export_model(ExportConfig(output=run_dir, base_model=base, format="safetensors"))
    return {"base": base, "model": model, "run": run_dir, "val": run_dir / "corpus" / "val.txt"}


def settings_for(val: Path, **overrides) -> EvalConfig:
    values = dict(corpus=(str(val),), max_seq_length=64, max_sequences=16, seed=SEED, pppl_tokens=120, batch_size=32)
    values.update(overrides)
    return EvalConfig(**values)


def test_eval_is_deterministic_reproduces_training_and_the_trained_model_wins(trained):
    models = [trained["base"], trained["model"]]
    first = evaluate_models(models, settings_for(trained["val"]))
    again = evaluate_models(models, settings_for(trained["val"]))
    assert first["models"] == again["models"], "same masks, same numbers"

    base, adapted = first["models"]
    metrics = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m for m in metrics if "val_mlm_loss" in m}
    # the same text path and the same fixed masks as training's validation (which runs under training's
    # autocast: bf16 on CPUs with AMX, hence the tolerance; cpt eval runs in fp32)
    assert base["mlm_loss"] == pytest.approx(logged[0]["val_mlm_loss"], rel=1e-3)
    assert base["mlm_acc"] == pytest.approx(logged[0]["val_mlm_acc"], abs=0.02)
    assert adapted["mlm_loss"] == pytest.approx(logged[STEPS]["val_mlm_loss"], rel=1e-3)
    assert base["masked_tokens"] == adapted["masked_tokens"] > 50

    assert adapted["mlm_loss"] < base["mlm_loss"] - 1.0
    assert adapted["mlm_acc"] > base["mlm_acc"] + 0.02
    assert adapted["pseudo_perplexity"] < base["pseudo_perplexity"] / 2
    assert adapted["pppl_tokens"] == base["pppl_tokens"] == 120

    other_seed = evaluate_models([trained["base"]], settings_for(trained["val"], seed=SEED + 1, pppl_tokens=0))
    assert other_seed["models"][0]["mlm_loss"] != base["mlm_loss"], "the seed picks the masks"
    assert "pseudo_perplexity" not in other_seed["models"][0]


def test_pseudo_perplexity_equals_masking_one_token_at_a_time(tiny_base_template):
    tokenizer = load_tokenizer(tiny_base_template)
    model = load_mlm_model(tiny_base_template).eval()
    rows = tokenizer.encode_with_specials(["今天天气很好", "我们去公园散步吧"], 64)
    ids = np.concatenate(rows).astype(np.int64)
    offsets = np.array([0, len(rows[0]), len(ids)])
    sequences = TokenizedText(ids, np.ones(len(ids), dtype=bool), offsets)
    special = np.array(sorted(tokenizer.all_special_ids))
    budget = len(rows[0]) - 2 + 3  # all of the first sequence and 3 tokens of the second
    got = pseudo_perplexity(model, sequences, mask_token_id=tokenizer.mask_token_id, special_ids=special,
                            max_tokens=budget, batch_size=4, device=torch.device("cpu"))

    log_probs = []
    with torch.no_grad():
        for row in rows:
            for position in range(1, len(row) - 1):
                if len(log_probs) == budget:
                    break
                masked = torch.tensor([row])
                masked[0, position] = tokenizer.mask_token_id
                logits = model(input_ids=masked).logits[0, position]
                log_probs.append(torch.log_softmax(logits, -1)[row[position]].item())
    assert got["pppl_tokens"] == budget
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(-sum(log_probs) / budget), rel=1e-4)


def test_models_with_different_vocabularies_are_refused(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained["base"], other)
    vocab = other / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("[unused1]", "[unusedX]"), encoding="utf-8")
    with pytest.raises(BadInput, match="different tokenizers"):
        evaluate_models([trained["base"], other], settings_for(trained["val"]))


def test_cli_json_and_table(trained):
    runner = CliRunner()
    args = ["eval", "--model", str(trained["base"]), "--model", str(trained["model"]), "--corpus", str(trained["val"]),
            "--max-seq-length", "64", "--max-sequences", "8", "--pppl-tokens", "50", "--seed", str(SEED)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["model"] for m in report["models"]] == [str(trained["base"]), str(trained["model"])]
    assert report["data"]["sequences"] == 8 and report["settings"]["masking"] == "wwm+span"
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "pseudo-perplexity" in table.stdout


@pytest.mark.parametrize(
    ("which", "fragment"),
    [("model", "--model /nonexistent/model: no such directory"), ("corpus", "/nonexistent/held_out.txt")],
)
def test_bad_inputs_exit_3_with_one_line(trained, which, fragment):
    model = "/nonexistent/model" if which == "model" else str(trained["base"])
    corpus = "/nonexistent/held_out.txt" if which == "corpus" else str(trained["val"])
    result = CliRunner().invoke(app, ["eval", "--model", model, "--corpus", corpus])
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cpt: error:") and fragment in lines[0]
