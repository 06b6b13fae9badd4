"""cpt.export.hf_dir: base files + a state dict -> a Hugging Face dir, verified in its temp dir, then put in
place atomically (export replaces its previous dir, convert only fills a new or empty one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpt.common.weights import read_state_dict, write_state_dict
from cpt.export.hf_dir import write_hf_dir


class Refused(Exception):
    pass


@pytest.fixture
def base(tmp_path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"vocab_size": 4,\n "model_type": "bert"}', encoding="utf-8")
    (base / "vocab.txt").write_text("[PAD]\n[UNK]\na\nb\n", encoding="utf-8")
    (base / "tokenizer_config.json").write_text('{"do_lower_case": true}', encoding="utf-8")
    (base / "README.md").write_text("the base's card", encoding="utf-8")
    (base / ".hidden").write_text("not carried", encoding="utf-8")
    write_state_dict({"w": torch.zeros(4, 2)}, base / "pytorch_model.bin")
    (base / "pytorch_model.bin.index.json").write_text("{}", encoding="utf-8")
    for other_format in ("tf_model.h5", "tf_model.h5.index.json", "flax_model.msgpack", "model.onnx",
                         "bert_model.ckpt.meta", "checkpoint", "model_state.pdparams", "optimizer.pt",
                         "pytorch_model.bin.before-cpt-20261206-120000", "vocab.txt.before-cpt-20261206-120000"):
        (base / other_format).write_bytes(b"the base's weights or an original --into-base kept")
    return base


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 2), value)}


def names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def test_every_base_file_but_its_weights_in_any_format_travels_with_the_new_weights(tmp_path, base):
    target = write_hf_dir(tmp_path / "model", base, state(1.0), weight_format="both")
    assert names(target) == {"config.json", "vocab.txt", "tokenizer_config.json", "README.md", "model.safetensors",
                             "pytorch_model.bin"}
    for name in ("config.json", "vocab.txt", "README.md"):
        assert (target / name).read_bytes() == (base / name).read_bytes(), "copied byte for byte"
    for name in ("model.safetensors", "pytorch_model.bin"):
        assert torch.equal(read_state_dict(target / name)["w"], state(1.0)["w"])
    assert names(tmp_path) == {"base", "model"}, "no temp dir left beside it"


def test_chosen_files_tokenizer_overrides_and_config_updates(tmp_path, base):
    extended = tmp_path / "extended"
    extended.mkdir()
    (extended / "vocab.txt").write_text("[PAD]\n[UNK]\na\nb\n“\n", encoding="utf-8")
    target = write_hf_dir(tmp_path / "model", base, state(1.0), weight_format="safetensors",
                          base_files=["config.json", "vocab.txt", "special_tokens_map.json"],
                          tokenizer_files=[extended / "vocab.txt"], config_updates={"vocab_size": 5})
    assert names(target) == {"config.json", "vocab.txt", "model.safetensors"}, "absent base files are skipped"
    assert (target / "vocab.txt").read_bytes() == (extended / "vocab.txt").read_bytes()
    assert json.loads((target / "config.json").read_text(encoding="utf-8")) == {"vocab_size": 5, "model_type": "bert"}
    assert json.loads((base / "config.json").read_text(encoding="utf-8"))["vocab_size"] == 4, "the base is untouched"


def test_verify_runs_on_the_full_temp_dir_and_a_refusal_keeps_the_previous_dir(tmp_path, base):
    previous = write_hf_dir(tmp_path / "model", base, state(1.0), weight_format="bin")
    seen = []

    def verify(model_dir: Path) -> None:
        seen.append((model_dir.name, names(model_dir)))
        raise Refused

    with pytest.raises(Refused):
        write_hf_dir(tmp_path / "model", base, state(2.0), weight_format="safetensors", verify=verify, replace=True)
    assert seen == [(".model.tmp", {"config.json", "vocab.txt", "tokenizer_config.json", "README.md",
                                    "model.safetensors"})]
    assert torch.equal(read_state_dict(previous / "pytorch_model.bin")["w"], state(1.0)["w"])
    assert names(tmp_path) == {"base", "model"}

    write_hf_dir(tmp_path / "model", base, state(2.0), weight_format="safetensors", verify=lambda _: None, replace=True)
    assert "pytorch_model.bin" not in names(previous), "replace swaps the whole dir"
    assert torch.equal(read_state_dict(previous / "model.safetensors")["w"], state(2.0)["w"])
    assert names(tmp_path) == {"base", "model"}


def test_without_replace_a_non_empty_dir_is_refused_and_an_empty_one_filled(tmp_path, base):
    (tmp_path / "empty").mkdir()
    write_hf_dir(tmp_path / "empty", base, state(1.0))
    assert "model.safetensors" in names(tmp_path / "empty")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError):
        write_hf_dir(tmp_path / "full", base, state(1.0))
    assert names(tmp_path / "full") == {"keep.txt"}
    assert names(tmp_path) == {"base", "empty", "full"}
