"""UER-py <-> Hugging Face conversion on tiny random BERTs: bit-identical round trips, logits, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, BertForPreTraining

from cpt.common.weights import read_state_dict
from cpt.errors import BadInput, UsageError
from cpt.export.convert import ConvertReport, hf_state_to_uer, hf_to_uer, key_pairs, uer_state_to_hf, uer_to_hf

VOCAB = Path(__file__).resolve().parents[2] / "cpt" / "assets" / "zh_vocab.txt"
VOCAB_SIZE = sum(1 for _ in VOCAB.open(encoding="utf-8"))
SP_KEYS = (
    "bert.pooler.dense.weight",
    "bert.pooler.dense.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
)
OLD_UER_NAMES = {  # newest name -> the name UER-py wrote before 2023
    "embedding.word.embedding.weight": "embedding.word_embedding.weight",
    "embedding.pos.embedding.weight": "embedding.position_embedding.weight",
    "embedding.seg.embedding.weight": "embedding.segment_embedding.weight",
    "target.mlm.linear_1.weight": "target.mlm_linear_1.weight",
    "target.mlm.linear_1.bias": "target.mlm_linear_1.bias",
    "target.mlm.layer_norm.gamma": "target.layer_norm.gamma",
    "target.mlm.layer_norm.beta": "target.layer_norm.beta",
    "target.mlm.linear_2.weight": "target.mlm_linear_2.weight",
    "target.mlm.linear_2.bias": "target.mlm_linear_2.bias",
    "target.sp.linear_1.weight": "target.nsp_linear_1.weight",
    "target.sp.linear_1.bias": "target.nsp_linear_1.bias",
    "target.sp.linear_2.weight": "target.nsp_linear_2.weight",
    "target.sp.linear_2.bias": "target.nsp_linear_2.bias",
}


# UER-py's scripts/convert_bert_from_huggingface_to_uer.py, written out: UER name -> HF name.
UER_SCRIPT_NAMES = {
    "embedding.word.embedding.weight": "bert.embeddings.word_embeddings.weight",
    "embedding.pos.embedding.weight": "bert.embeddings.position_embeddings.weight",
    "embedding.layer_norm.gamma": "bert.embeddings.LayerNorm.weight",
    "embedding.layer_norm.beta": "bert.embeddings.LayerNorm.bias",
    **{
        f"encoder.transformer.{i}.{uer}": f"bert.encoder.layer.{i}.{hf}"
        for i in range(2)
        for uer, hf in {
            "self_attn.linear_layers.0.weight": "attention.self.query.weight",
            "self_attn.linear_layers.0.bias": "attention.self.query.bias",
            "self_attn.linear_layers.1.weight": "attention.self.key.weight",
            "self_attn.linear_layers.1.bias": "attention.self.key.bias",
            "self_attn.linear_layers.2.weight": "attention.self.value.weight",
            "self_attn.linear_layers.2.bias": "attention.self.value.bias",
            "self_attn.final_linear.weight": "attention.output.dense.weight",
            "self_attn.final_linear.bias": "attention.output.dense.bias",
            "layer_norm_1.gamma": "attention.output.LayerNorm.weight",
            "layer_norm_1.beta": "attention.output.LayerNorm.bias",
            "feed_forward.linear_1.weight": "intermediate.dense.weight",
            "feed_forward.linear_1.bias": "intermediate.dense.bias",
            "feed_forward.linear_2.weight": "output.dense.weight",
            "feed_forward.linear_2.bias": "output.dense.bias",
            "layer_norm_2.gamma": "output.LayerNorm.weight",
            "layer_norm_2.beta": "output.LayerNorm.bias",
        }.items()
    },
    "target.mlm.linear_1.weight": "cls.predictions.transform.dense.weight",
    "target.mlm.linear_1.bias": "cls.predictions.transform.dense.bias",
    "target.mlm.layer_norm.gamma": "cls.predictions.transform.LayerNorm.weight",
    "target.mlm.layer_norm.beta": "cls.predictions.transform.LayerNorm.bias",
    "target.mlm.linear_2.weight": "cls.predictions.decoder.weight",
    "target.mlm.linear_2.bias": "cls.predictions.bias",
}
UER_SCRIPT_SP_NAMES = {
    "target.sp.linear_1.weight": "bert.pooler.dense.weight",
    "target.sp.linear_1.bias": "bert.pooler.dense.bias",
    "target.sp.linear_2.weight": "cls.seq_relationship.weight",
    "target.sp.linear_2.bias": "cls.seq_relationship.bias",
}


def tiny_config(layers: int = 2, hidden_size: int = 32) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def make_hf_dir(path: Path, *, seed: int, layers: int = 2, head=BertForPreTraining, save_pretrained=False) -> Path:
    """A model dir like the real hfl checkpoint: config.json, vocab.txt, torch.save'd state dict."""
    torch.manual_seed(seed)
    model = head(tiny_config(layers)).eval()
    path.mkdir(parents=True)
    if save_pretrained:  # what cpt export writes: safetensors without the tied decoder weight
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    shutil.copyfile(VOCAB, path / "vocab.txt")
    return path


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = error.value.message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_hf_dir(tmp_path / "base", seed=0)


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """The same architecture with other weights: stands for the model UER-py trained."""
    return make_hf_dir(tmp_path / "trained", seed=1)


def uer_file_of(hf_dir: Path, path: Path, target: str = "mlm") -> Path:
    hf_to_uer(hf_dir, path, target=target)
    return path


@pytest.mark.parametrize("target", ["mlm", "bert"])
def test_hf_to_uer_to_hf_is_bit_identical(tmp_path: Path, base: Path, trained: Path, target: str) -> None:
    uer_file = uer_file_of(trained, tmp_path / "uer.bin", target)
    report = uer_to_hf(uer_file, base, tmp_path / "out", target=target)

    base_state = read_state_dict(base / "pytorch_model.bin")
    trained_state = read_state_dict(trained / "pytorch_model.bin")
    expected_from_base = SP_KEYS if target == "mlm" else ()
    assert report == ConvertReport(
        layers=2, written=tmp_path / "out", keys_from_base=expected_from_base, keys_left_out=()
    )
    for weights in ("model.safetensors", "pytorch_model.bin"):
        out = read_state_dict(tmp_path / "out" / weights)
        assert sorted(out) == sorted(base_state)
        for key, tensor in out.items():
            want = base_state[key] if key in expected_from_base else trained_state[key]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), (weights, key)
    for name in ("config.json", "vocab.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()


@pytest.mark.parametrize("target", ["mlm", "bert"])
def test_hf_to_uer_matches_uer_pys_script(tmp_path: Path, trained: Path, target: str) -> None:
    report = hf_to_uer(trained, tmp_path / "uer.bin", target=target)
    uer = read_state_dict(tmp_path / "uer.bin")
    hf = read_state_dict(trained / "pytorch_model.bin")

    expected = {**UER_SCRIPT_NAMES, **(UER_SCRIPT_SP_NAMES if target == "bert" else {})}
    assert report == ConvertReport(
        layers=2, written=tmp_path / "uer.bin", keys_from_base=(), keys_left_out=SP_KEYS if target == "mlm" else ()
    )
    assert sorted(uer) == sorted([*expected, "embedding.seg.embedding.weight"])
    for uer_name, hf_name in expected.items():
        assert torch.equal(uer[uer_name], hf[hf_name]), uer_name
    segments = uer["embedding.seg.embedding.weight"]  # UER's row 0 embeds padding; HF's 2 types follow
    assert segments.shape == (3, 32) and torch.equal(segments[0], torch.zeros(32))
    assert torch.equal(segments[1:], hf["bert.embeddings.token_type_embeddings.weight"])


def test_converted_model_gives_the_trained_models_logits(tmp_path: Path, base: Path, trained: Path) -> None:
    uer_to_hf(uer_file_of(trained, tmp_path / "uer.bin"), base, tmp_path / "out")
    torch.manual_seed(1)
    reference = BertForPreTraining(tiny_config()).eval()
    reference.load_state_dict(read_state_dict(trained / "pytorch_model.bin"))
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 16))  # (B, T)
    token_type_ids = torch.cat([torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        want = reference(input_ids=input_ids, token_type_ids=token_type_ids).prediction_logits
        got = converted(input_ids=input_ids, token_type_ids=token_type_ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("target", ["mlm", "bert"])
def test_pure_mappings_are_what_the_stages_write(tmp_path: Path, base: Path, trained: Path, target: str) -> None:
    hf = read_state_dict(trained / "pytorch_model.bin")
    config = json.loads((trained / "config.json").read_text(encoding="utf-8"))  # the same as the base's
    to_uer = hf_state_to_uer(hf, config, with_sp=target == "bert", weights_file=trained / "pytorch_model.bin")
    written = read_state_dict(uer_file_of(trained, tmp_path / "uer.bin", target))
    assert list(to_uer.state) == list(written)
    assert all(torch.equal(to_uer.state[key], written[key]) for key in written)

    base_state = read_state_dict(base / "pytorch_model.bin")
    to_hf = uer_state_to_hf(to_uer.state, base_state, config, target="auto", uer_file=tmp_path / "uer.bin", base_model_dir=base)
    assert list(to_hf.state) == list(base_state) and to_hf.config_updates is None
    for key, tensor in to_hf.state.items():  # a round trip in memory gives the trained tensors back, bit for bit
        assert torch.equal(tensor, base_state[key] if key in to_hf.keys_from_base else hf[key]), key
    assert to_hf.report(tmp_path / "out") == uer_to_hf(tmp_path / "uer.bin", base, tmp_path / "out")


def test_key_table_maps_one_to_one() -> None:
    """Both directions read the one table: each HF key and each UER name appears once, so each inverts the other."""
    pairs = key_pairs(3, with_sp=True)
    hf_keys = [hf_key for hf_key, _ in pairs]
    uer_names = [name for _, names in pairs for name in names]
    assert len(set(hf_keys)) == len(hf_keys) and len(set(uer_names)) == len(uer_names)
    assert sum(key.startswith("bert.encoder.layer.2.") for key in hf_keys) == 16


@pytest.mark.parametrize("layers", [2, 3])
def test_layer_count_is_read_from_the_weights(tmp_path: Path, layers: int) -> None:
    base = make_hf_dir(tmp_path / "base", seed=0, layers=layers)
    trained = make_hf_dir(tmp_path / "trained", seed=1, layers=layers)
    assert hf_to_uer(trained, tmp_path / "uer.bin").layers == layers
    assert uer_to_hf(tmp_path / "uer.bin", base, tmp_path / "out").layers == layers


def test_auto_target_detects_the_sp_head(tmp_path: Path, base: Path, trained: Path) -> None:
    assert uer_to_hf(uer_file_of(trained, tmp_path / "mlm.bin", "mlm"), base, tmp_path / "a").keys_from_base == SP_KEYS
    assert uer_to_hf(uer_file_of(trained, tmp_path / "bert.bin", "bert"), base, tmp_path / "b").keys_from_base == ()
    # An explicit mlm target ignores the sp head and says so.
    report = uer_to_hf(tmp_path / "bert.bin", base, tmp_path / "c", target="mlm")
    assert report.keys_from_base == SP_KEYS
    assert sorted(report.keys_left_out) == sorted(
        f"target.sp.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    )


def test_pre_2023_uer_names_are_accepted(tmp_path: Path, base: Path, trained: Path) -> None:
    uer = read_state_dict(uer_file_of(trained, tmp_path / "new.bin", "bert"))
    torch.save({OLD_UER_NAMES.get(key, key): tensor for key, tensor in uer.items()}, tmp_path / "old.bin")
    uer_to_hf(tmp_path / "new.bin", base, tmp_path / "from_new")
    uer_to_hf(tmp_path / "old.bin", base, tmp_path / "from_old")
    new = read_state_dict(tmp_path / "from_new" / "model.safetensors")
    old = read_state_dict(tmp_path / "from_old" / "model.safetensors")
    assert all(torch.equal(new[key], old[key]) for key in new)


def test_untied_uer_decoder_unties_the_config(tmp_path: Path, base: Path, trained: Path) -> None:
    uer = read_state_dict(uer_file_of(trained, tmp_path / "uer.bin"))
    uer["target.mlm.linear_2.weight"] = uer["target.mlm.linear_2.weight"] + 1.0
    torch.save(uer, tmp_path / "untied.bin")
    uer_to_hf(tmp_path / "untied.bin", base, tmp_path / "out")
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    assert converted.config.tie_word_embeddings is False
    assert torch.equal(converted.cls.predictions.decoder.weight, uer["target.mlm.linear_2.weight"])
    assert torch.equal(converted.bert.embeddings.word_embeddings.weight, uer["embedding.word.embedding.weight"])


def test_save_pretrained_dirs_convert_both_ways(tmp_path: Path) -> None:
    base = make_hf_dir(tmp_path / "base", seed=0, save_pretrained=True)
    trained = make_hf_dir(tmp_path / "trained", seed=1, save_pretrained=True)
    hf_to_uer(trained, tmp_path / "uer.bin", target="bert")
    uer_to_hf(tmp_path / "uer.bin", base, tmp_path / "out")
    want = read_state_dict(trained / "model.safetensors")
    got = read_state_dict(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(read_state_dict(base / "model.safetensors"))
    assert all(torch.equal(got[key], want[key]) for key in got)


def test_masked_lm_base_leaves_out_the_sp_head(tmp_path: Path, trained: Path) -> None:
    base = make_hf_dir(tmp_path / "mlm_base", seed=0, head=BertForMaskedLM)
    report = uer_to_hf(uer_file_of(trained, tmp_path / "uer.bin", "bert"), base, tmp_path / "out")
    assert len(report.keys_left_out) == 4 and all(key.startswith("target.sp.") for key in report.keys_left_out)
    written = read_state_dict(tmp_path / "out" / "model.safetensors")
    assert sorted(written) == sorted(read_state_dict(base / "pytorch_model.bin"))
    with pytest.raises(BadInput) as error:
        hf_to_uer(base, tmp_path / "uer_bert.bin", target="bert")
    assert_one_line(error, "bert.pooler.dense.weight", "--target mlm")


def test_base_dir_is_untouched(tmp_path: Path, base: Path, trained: Path) -> None:
    before = tree_digest(base)
    uer_to_hf(uer_file_of(trained, tmp_path / "uer.bin"), base, tmp_path / "out")
    hf_to_uer(base, tmp_path / "base_uer.bin")
    assert tree_digest(base) == before


def test_empty_output_dir_is_filled_and_non_empty_is_refused(tmp_path: Path, base: Path, trained: Path) -> None:
    uer_file = uer_file_of(trained, tmp_path / "uer.bin")
    (tmp_path / "empty").mkdir()
    uer_to_hf(uer_file, base, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(BadInput) as error:
        uer_to_hf(uer_file, base, tmp_path / "full")
    assert_one_line(error, str(tmp_path / "full"))
    assert tree_digest(tmp_path / "full") == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(BadInput) as error:
        hf_to_uer(trained, uer_file)
    assert_one_line(error, str(uer_file), "already exists")


def edited_uer(tmp_path: Path, trained: Path, edit) -> Path:
    uer = read_state_dict(uer_file_of(trained, tmp_path / "uer.bin"))
    edit(uer)
    torch.save(uer, tmp_path / "edited.bin")
    return tmp_path / "edited.bin"


def test_unknown_key_is_refused(tmp_path: Path, base: Path, trained: Path) -> None:
    path = edited_uer(tmp_path, trained, lambda uer: uer.update({"encoder.layer_norm.gamma": torch.ones(32)}))
    with pytest.raises(BadInput) as error:
        uer_to_hf(path, base, tmp_path / "out")
    assert_one_line(error, str(path), "encoder.layer_norm.gamma")
    assert not (tmp_path / "out").exists()


def test_missing_key_is_refused(tmp_path: Path, base: Path, trained: Path) -> None:
    path = edited_uer(tmp_path, trained, lambda uer: uer.pop("encoder.transformer.1.feed_forward.linear_2.bias"))
    with pytest.raises(BadInput) as error:
        uer_to_hf(path, base, tmp_path / "out")
    assert_one_line(error, str(path), "encoder.transformer.1.feed_forward.linear_2.bias")
    with pytest.raises(BadInput) as error:
        uer_to_hf(uer_file_of(trained, tmp_path / "mlm.bin"), base, tmp_path / "out", target="bert")
    assert_one_line(error, "target.sp.linear_1.weight", "--target mlm")


def test_shape_mismatch_is_refused(tmp_path: Path, base: Path, trained: Path) -> None:
    path = edited_uer(tmp_path, trained, lambda uer: uer.update({"target.mlm.linear_1.bias": torch.zeros(33)}))
    with pytest.raises(BadInput) as error:
        uer_to_hf(path, base, tmp_path / "out")
    assert_one_line(error, str(path), "target.mlm.linear_1.bias (33,) vs (32,)")

    deeper = make_hf_dir(tmp_path / "deeper", seed=1, layers=3)
    with pytest.raises(BadInput) as error:
        uer_to_hf(uer_file_of(deeper, tmp_path / "deeper.bin"), base, tmp_path / "out")
    assert_one_line(error, "3 transformer layers", "has 2")
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_uer_checkpoints_are_refused(tmp_path: Path, base: Path, trained: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 64)
    with pytest.raises(BadInput) as error:
        uer_to_hf(garbage, base, tmp_path / "out")
    assert_one_line(error, str(garbage))

    with pytest.raises(BadInput) as error:
        uer_to_hf(trained / "pytorch_model.bin", base, tmp_path / "out")
    assert_one_line(error, "Hugging Face checkpoint")

    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(BadInput) as error:
        uer_to_hf(tmp_path / "other.bin", base, tmp_path / "out")
    assert_one_line(error, "not a UER-py BERT checkpoint")

    with pytest.raises(BadInput) as error:
        hf_to_uer(tmp_path, tmp_path / "x.bin")
    assert_one_line(error, str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_unknown_target_is_a_usage_error(tmp_path: Path, base: Path, trained: Path) -> None:
    with pytest.raises(UsageError):
        uer_to_hf(tmp_path / "uer.bin", base, tmp_path / "out", target="nsp")
    with pytest.raises(UsageError):
        hf_to_uer(trained, tmp_path / "uer.bin", target="auto")
