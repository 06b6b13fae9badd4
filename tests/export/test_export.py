"""Export: every base key carried (untouched ones bit-identical), reload in transformers, formats, --into-base."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import prepare_and_tokenize
from transformers import AutoModelForMaskedLM, BertForPreTraining

from cpt.common.weights import read_state_dict
from cpt.config import ExportConfig, TrainConfig
from cpt.errors import BadInput
from cpt.export.export import export_model
from cpt.training import checkpoint as ckpt
from cpt.training.loop import train


@pytest.fixture
def trained_run(tmp_path, tiny_base, small_corpus):
    run_dir = tmp_path / "run"
    prepare_and_tokenize(run_dir, small_corpus, tiny_base)
    train(TrainConfig(output=run_dir, base_model=tiny_base, micro_batch_size=4, global_batch_size=8, max_steps=4,
                      lr=1e-3, warmup_steps=0, eval_interval=2, save_interval=2, eval_max_sequences=8))
    return run_dir


def test_export_carries_every_base_key_and_reloads(trained_run, tiny_base):
    base_before = {p.name: p.read_bytes() for p in tiny_base.iterdir()}
    model_dir = export_model(ExportConfig(output=trained_run, base_model=tiny_base))
    assert {p.name for p in tiny_base.iterdir()} == set(base_before)
    assert all(p.read_bytes() == base_before[p.name] for p in tiny_base.iterdir()), "the base is never written"

    base_state = read_state_dict(tiny_base / "pytorch_model.bin")
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        exported = read_state_dict(model_dir / file_name)
        assert exported.keys() == base_state.keys()
        for untouched in ("bert.pooler.dense.weight", "cls.seq_relationship.weight", "cls.seq_relationship.bias"):
            assert torch.equal(exported[untouched], base_state[untouched])
        assert not torch.equal(exported["bert.encoder.layer.0.attention.self.query.weight"],
                               base_state["bert.encoder.layer.0.attention.self.query.weight"])
    assert (model_dir / "vocab.txt").read_bytes() == (tiny_base / "vocab.txt").read_bytes()
    assert (model_dir / "config.json").read_bytes() == (tiny_base / "config.json").read_bytes()

    best = ckpt.best_pointer(trained_run)
    trained = read_state_dict(ckpt.step_dir(trained_run, best["step"]) / "model.safetensors")
    reference = AutoModelForMaskedLM.from_pretrained(str(tiny_base))
    reference.load_state_dict(trained, strict=False)
    reloaded = AutoModelForMaskedLM.from_pretrained(str(model_dir))
    pretraining = BertForPreTraining.from_pretrained(str(model_dir))
    input_ids = torch.tensor([[101, 2769, 4263, 1266, 776, 102]])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=input_ids).logits, reference.eval()(input_ids=input_ids).logits)
        pooled = pretraining.eval().bert(input_ids=input_ids).pooler_output
    assert pooled.shape == (1, 64)


def test_export_formats_and_rerun_is_noop(trained_run, tiny_base):
    model_dir = export_model(ExportConfig(output=trained_run, base_model=tiny_base, format="safetensors"))
    assert (model_dir / "model.safetensors").exists() and not (model_dir / "pytorch_model.bin").exists()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    export_model(ExportConfig(output=trained_run, base_model=tiny_base, format="safetensors"))
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    export_model(ExportConfig(output=trained_run, base_model=tiny_base, format="bin", checkpoint="latest"))
    assert (model_dir / "pytorch_model.bin").exists() and not (model_dir / "model.safetensors").exists()


def test_into_base_backs_up_the_original(trained_run, tiny_base):
    original = (tiny_base / "pytorch_model.bin").read_bytes()
    export_model(ExportConfig(output=trained_run, base_model=tiny_base, into_base=True))
    backups = list(tiny_base.glob("pytorch_model.bin.before-cpt-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == original
    assert (tiny_base / "pytorch_model.bin").read_bytes() == (trained_run / "model" / "pytorch_model.bin").read_bytes()
    assert not (tiny_base / "model.safetensors").exists(), "only the formats the base had are replaced"


def test_other_frameworks_weights_stay_out_of_the_export_and_into_base_warns_of_them(trained_run, tiny_base, capsys):
    """The hub repo of the default base has tf_model.h5 and flax_model.msgpack beside pytorch_model.bin: the
    base's weights. Copied beside the trained weights they would hand a TensorFlow/Flax user the base,
    silently; nor may the originals --into-base kept travel into the next export."""
    others = ("tf_model.h5", "flax_model.msgpack", "bert_model.ckpt.index", "bert_model.ckpt.data-00000-of-00001",
              "training_args.bin", "rust_model.ot")
    for name in others:
        (tiny_base / name).write_bytes(b"the base's weights")
    (tiny_base / "README.md").write_text("model card", encoding="utf-8")
    model_dir = export_model(ExportConfig(output=trained_run, base_model=tiny_base))
    assert {p.name for p in model_dir.iterdir()} == {"config.json", "vocab.txt", "README.md", "model.safetensors",
                                                     "pytorch_model.bin"}
    said = " ".join(capsys.readouterr().err.split())
    assert "left out the base's bert_model.ckpt.data-00000-of-00001, bert_model.ckpt.index, flax_model.msgpack" in said

    export_model(ExportConfig(output=trained_run, base_model=tiny_base, into_base=True))
    said = " ".join(capsys.readouterr().err.split())
    assert "rust_model.ot, tf_model.h5, training_args.bin were left as they were" in said and "move them out" in said
    assert all((tiny_base / name).read_bytes() == b"the base's weights" for name in others), "never touched"
    assert list(tiny_base.glob("pytorch_model.bin.before-cpt-*"))

    export_model(ExportConfig(output=trained_run, base_model=tiny_base, checkpoint="latest"))  # a base with backups
    assert not [p.name for p in model_dir.iterdir() if "before-cpt" in p.name], "backups are not base files"


def test_an_export_of_an_older_cpt_holding_the_bases_tf_weights_is_redone(trained_run, tiny_base, capsys):
    model_dir = export_model(ExportConfig(output=trained_run, base_model=tiny_base))
    (model_dir / "tf_model.h5").write_bytes(b"the base's weights, copied by an older cpt")
    capsys.readouterr()
    export_model(ExportConfig(output=trained_run, base_model=tiny_base))
    assert "up to date" not in capsys.readouterr().err
    assert not (model_dir / "tf_model.h5").exists()
    export_model(ExportConfig(output=trained_run, base_model=tiny_base))
    assert "up to date" in capsys.readouterr().err, "a clean export is still not redone"


def test_missing_checkpoint_is_a_clear_error(trained_run, tiny_base):
    with pytest.raises(BadInput, match="step-00000099"):
        export_model(ExportConfig(output=trained_run, base_model=tiny_base, checkpoint="step-00000099"))
    shutil.rmtree(ckpt.checkpoints_dir(trained_run))
    (trained_run / "best.json").unlink()
    with pytest.raises(BadInput, match="best.json"):
        export_model(ExportConfig(output=trained_run, base_model=tiny_base))


def test_into_base_never_leaves_the_name_missing_nor_overwrites_a_backup(tmp_path, monkeypatch):
    from cpt.export import export as export_module

    original, source = tmp_path / "pytorch_model.bin", tmp_path / "new.bin"
    original.write_bytes(b"v0")
    real_copyfile = export_module.shutil.copyfile

    def copyfile(src, dst):
        assert original.read_bytes() in (b"v0", b"v1"), "the base keeps a complete file under its name throughout"
        return real_copyfile(src, dst)

    monkeypatch.setattr(export_module.shutil, "copyfile", copyfile)
    for version in (b"v1", b"v2"):  # two --into-base in the same second
        source.write_bytes(version)
        export_module._replace_keeping_original(source, original, "20260101-000000")
    assert original.read_bytes() == b"v2"
    assert {path.name: path.read_bytes() for path in tmp_path.glob("pytorch_model.bin.before-cpt-*")} == {
        "pytorch_model.bin.before-cpt-20260101-000000": b"v0", "pytorch_model.bin.before-cpt-20260101-000000-2": b"v1"}
