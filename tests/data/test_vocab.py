"""Vocabulary extension (`cpt tokenize --extend-vocab auto|FILE`, cpt/data/vocab.py): which tokens are added,
ids of the base vocab unchanged, the manifest's counts and [UNK] shares, the resized model's new rows,
train -> export -> reload in transformers with a round trip of text holding the new tokens."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt.common.base_model import load_tokenizer, load_tokenizer_dir, tokenizer_fingerprint
from cpt.config import ExportConfig, PrepareConfig, TokenizeConfig, TrainConfig, check
from cpt.data.prepare import prepare_corpus
from cpt.data.shards import ShardSet
from cpt.data.tokenization import tokenize_corpus
from cpt.data.vocab import TOKENIZER_DIR, training_tokenizer
from cpt.errors import BadInput
from cpt.training.model import resize_for_extension

BASE_VOCAB_SIZE, UNK = 21128, 100
ROUND_TRIP_TEXT = "他说：“引号”……——好‘的’"


@pytest.fixture
def unk_corpus(tmp_path) -> Path:
    """Synthetic news whose only [UNK]s are planted: “ ” in every document, — in every third, … in every
    second, ‘ ’ in 20, 坜 (a Chinese character missing from the vocab) in 30, 𪨶 in 3 (below the min count) and
    a Georgian word in 30 (its letters sit inside a word: adding them alone would not help, so auto leaves
    them out)."""
    lines = []
    for index in range(90):
        line = f"第{index}篇报道：记者说“今天的天气很好，市场也很平稳”，大家都表示同意。"
        if index % 3 == 0:
            line += "会议——在北京举行。"
        if index % 2 == 0:
            line += "真的吗……"
        if index >= 70:
            line += "他说‘好’。"
        if index < 30:
            line += "中坜市的居民很多。"
        if 30 <= index < 33:
            line += "他叫𪨶先生。"
        if 40 <= index < 70:
            line += "格鲁吉亚语写作ქართული。"
        lines.append(line)
    path = tmp_path / "unk_corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tokenize(run_dir: Path, base: Path, corpus: Path | None = None, **settings) -> dict:
    if corpus is not None:
        prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(corpus),), val_fraction=0.1))
    return tokenize_corpus(check(TokenizeConfig(output=run_dir, base_model=base, max_seq_length=64, workers=1,
                                                **settings)))


def train_counts(run_dir: Path, strings) -> dict[str, int]:
    """How often each string occurs in the train split (the reference the manifest's counts must equal)."""
    text = (run_dir / "corpus" / "train.txt").read_text(encoding="utf-8")
    return {string: text.count(string) for string in strings}


def base_unk_count(run_dir: Path, base: Path) -> tuple[int, int]:
    """([UNK]s, tokens) of the train split with the base tokenizer: the reference for `unk_share_before`."""
    texts = (run_dir / "corpus" / "train.txt").read_text(encoding="utf-8").split("\n")[:-1]
    rows = [encoding.ids for encoding in load_tokenizer(base).encode_batch(texts)]
    return sum(row.count(UNK) for row in rows), sum(len(row) for row in rows)


def test_auto_adds_exactly_the_frequent_unk_characters_and_keeps_every_base_id(tmp_path, tiny_base, unk_corpus):
    run_dir = tmp_path / "run"
    manifest = tokenize(run_dir, tiny_base, unk_corpus, extend_vocab="auto", extend_vocab_min_count=10)
    counts = train_counts(run_dir, "“”—…‘’坜𪨶")
    expected = sorted((c for c in "“”—…‘’坜" if counts[c] >= 10), key=lambda c: (-counts[c], c))
    assert counts["𪨶"] < 10 and len(expected) == 7
    extension = manifest["vocab_extension"]
    added = extension["added_tokens"]
    assert [token["token"] for token in added] == expected
    assert [token["id"] for token in added] == list(range(BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + 7))
    assert [token["count"] for token in added] == [counts[c] for c in expected]
    assert all(token["base_pieces"] == [UNK] for token in added)
    assert manifest["vocab_size"] == extension["vocab_size"] == BASE_VOCAB_SIZE + 7

    base_bytes = (tiny_base / "vocab.txt").read_bytes()
    extended_bytes = (run_dir / TOKENIZER_DIR / "vocab.txt").read_bytes()
    assert extended_bytes == base_bytes + "".join(f"{token}\n" for token in expected).encode()
    base, extended = load_tokenizer(tiny_base), load_tokenizer_dir(run_dir / TOKENIZER_DIR)
    assert {t: i for t, i in extended.get_vocab().items() if i < BASE_VOCAB_SIZE} == base.get_vocab()
    assert manifest["tokenizer_sha256"] == tokenizer_fingerprint(extended)

    # what the shards hold: the new ids where the base had [UNK]; the rest the same ids as the base gives
    train = manifest["splits"]["train"]
    shards = ShardSet(run_dir / "shards", "train")
    ids = np.concatenate([shards.sequence(i)[0] for i in range(len(shards))])
    for token in added:
        assert int((ids == token["id"]).sum()) == token["count"]
    assert train["unk_tokens"] == int((ids == UNK).sum()) > 0  # 𪨶 and the Georgian word stay [UNK]
    assert train["base_unk_tokens"] == train["unk_tokens"] + sum(token["count"] for token in added)
    assert (train["base_unk_tokens"], train["base_body_tokens"]) == base_unk_count(run_dir, tiny_base)
    assert extension["unk_share_before"] == train["base_unk_share"] > extension["unk_share_after"] == train["unk_share"]

    # a rerun is a no-op; --extend-vocab-max keeps the most frequent
    assert tokenize(run_dir, tiny_base, extend_vocab="auto", extend_vocab_min_count=10) == manifest
    fewer = tokenize(run_dir, tiny_base, extend_vocab="auto", extend_vocab_min_count=10, extend_vocab_max=2)
    assert [token["token"] for token in fewer["vocab_extension"]["added_tokens"]] == expected[:2]
    off = tokenize(run_dir, tiny_base)
    assert "vocab_extension" not in off and off["vocab_size"] == BASE_VOCAB_SIZE
    assert off["tokenizer_sha256"] == tokenizer_fingerprint(base)


def test_extend_vocab_from_a_file(tmp_path, tiny_base, unk_corpus):
    run_dir = tmp_path / "run"
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text("“\n”\n好\n\nქართული\n“\n", encoding="utf-8")  # 好 is in the vocab, “ repeated
    manifest = tokenize(run_dir, tiny_base, unk_corpus, extend_vocab=str(tokens_file))
    counts = train_counts(run_dir, ("“", "”", "ქართული"))
    added = manifest["vocab_extension"]["added_tokens"]
    assert [(t["token"], t["id"]) for t in added] == [("“", 21128), ("”", 21129), ("ქართული", 21130)]
    assert [t["count"] for t in added] == [counts["“"], counts["”"], counts["ქართული"]] and counts["ქართული"] > 0
    assert added[2]["base_pieces"] == [UNK] and not added[2]["isolated"]  # counted by the base tokenizer
    train = manifest["splits"]["train"]
    assert (train["base_unk_tokens"], train["base_body_tokens"]) == base_unk_count(run_dir, tiny_base)
    assert train["base_unk_tokens"] == train["unk_tokens"] + sum(t["count"] for t in added)

    for bad, reason in (("区块链\n", "cuts"), ("Blockchain\n", "normalizes")):
        tokens_file.write_text(bad, encoding="utf-8")
        with pytest.raises(BadInput, match=reason):
            tokenize(run_dir, tiny_base, extend_vocab=str(tokens_file))
    with pytest.raises(BadInput, match="--extend-vocab"):
        check(TokenizeConfig(output=run_dir, base_model=tiny_base, extend_vocab=str(tmp_path / "missing.txt")))


def test_base_with_tokenizer_json_gets_an_extended_tokenizer_json(tmp_path, tiny_base, unk_corpus):
    from transformers import AutoTokenizer

    load_tokenizer(tiny_base).backend_tokenizer.save(str(tiny_base / "tokenizer.json"))
    run_dir = tmp_path / "run"
    manifest = tokenize(run_dir, tiny_base, unk_corpus, extend_vocab="auto")
    added = {t["token"]: t["id"] for t in manifest["vocab_extension"]["added_tokens"]}
    definition = json.loads((run_dir / TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(definition["model"]["vocab"][token] == token_id for token, token_id in added.items())
    reloaded = AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER_DIR))
    ids = reloaded("“坜”", add_special_tokens=False)["input_ids"]
    assert ids == [added["“"], added["坜"], added["”"]]


def test_new_rows_start_from_unk_and_share_its_probability(tmp_path, tiny_base, unk_corpus):
    from cpt.training.model import load_mlm_model

    run_dir = tmp_path / "run"
    manifest = tokenize(run_dir, tiny_base, unk_corpus, extend_vocab="auto")
    model = load_mlm_model(tiny_base)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    old_bias = model.cls.predictions.bias.detach().clone()
    resize_for_extension(model, manifest)
    embeddings, bias = model.get_input_embeddings().weight, model.cls.predictions.bias
    added = manifest["vocab_extension"]["added_tokens"]
    assert embeddings.shape[0] == bias.shape[0] == model.config.vocab_size == BASE_VOCAB_SIZE + len(added)
    assert model.cls.predictions.decoder.weight is embeddings  # still tied
    assert torch.equal(embeddings[:BASE_VOCAB_SIZE], old_embeddings) and torch.equal(bias[:BASE_VOCAB_SIZE], old_bias)
    total = sum(t["count"] + 1 for t in added)
    for token in added:
        assert torch.equal(embeddings[token["id"]], old_embeddings[UNK])
        assert math.isclose(bias[token["id"]].item(), old_bias[UNK].item() + math.log((token["count"] + 1) / total),
                            rel_tol=1e-5, abs_tol=1e-6)
    # the shares add up: the new tokens together get [UNK]'s probability, split by frequency
    assert math.isclose(torch.logsumexp(bias[BASE_VOCAB_SIZE:].detach(), 0).item(), old_bias[UNK].item(), abs_tol=1e-5)
    # at step 0 the encoder sees text with the new tokens exactly as the base saw it with [UNK]s
    extended_ids = torch.tensor([[101, added[0]["id"], 2769, added[1]["id"], 102]])
    base_ids = torch.where(extended_ids >= BASE_VOCAB_SIZE, UNK, extended_ids)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.bert(input_ids=extended_ids).last_hidden_state,
                           model.bert(input_ids=base_ids).last_hidden_state)
    resize_for_extension(model, manifest)  # a second call (a resumed session) changes nothing
    assert model.get_input_embeddings().weight.shape[0] == BASE_VOCAB_SIZE + len(added)


def test_training_uses_the_extended_tokenizer_only_with_its_base(tmp_path, tiny_base, unk_corpus):
    run_dir = tmp_path / "run"
    manifest = tokenize(run_dir, tiny_base, unk_corpus, extend_vocab="auto")
    assert tokenizer_fingerprint(training_tokenizer(run_dir, tiny_base, manifest)) == manifest["tokenizer_sha256"]
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    with open(other / "vocab.txt", "r+", encoding="utf-8") as handle:  # one token renamed: another tokenizer
        text = handle.read().replace("\n[unused1]\n", "\n[unused99x]\n", 1)
        handle.seek(0)
        handle.write(text)
    assert tokenizer_fingerprint(training_tokenizer(run_dir, other, manifest)) != manifest["tokenizer_sha256"]

    shutil.rmtree(run_dir / TOKENIZER_DIR)  # lost: a clear error, and a rerun of tokenize writes it again
    with pytest.raises(BadInput, match="rerun `cpt tokenize`"):
        training_tokenizer(run_dir, tiny_base, manifest)
    assert tokenize(run_dir, tiny_base, extend_vocab="auto") == manifest
    assert tokenizer_fingerprint(training_tokenizer(run_dir, tiny_base, manifest)) == manifest["tokenizer_sha256"]


def test_extended_run_trains_exports_and_round_trips_in_transformers(tmp_path, tiny_base, unk_corpus):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from cpt.common.weights import read_state_dict
    from cpt.export.export import export_model
    from cpt.training import checkpoint as ckpt
    from cpt.training.loop import train

    run_dir = tmp_path / "run"
    manifest = tokenize(run_dir, tiny_base, unk_corpus, extend_vocab="auto")
    added = {t["token"]: t["id"] for t in manifest["vocab_extension"]["added_tokens"]}
    vocab_size = manifest["vocab_size"]
    train(TrainConfig(output=run_dir, base_model=tiny_base, micro_batch_size=4, global_batch_size=8, max_steps=4,
                      lr=1e-3, warmup_steps=0, eval_interval=2, save_interval=2, eval_max_sequences=8,
                      head_warmup="off"))
    latest = ckpt.latest_valid_checkpoint(run_dir)
    trained = read_state_dict(latest / "model.safetensors")
    embeddings = trained["bert.embeddings.word_embeddings.weight"]
    assert embeddings.shape[0] == trained["cls.predictions.bias"].shape[0] == vocab_size
    assert not torch.equal(embeddings[added["“"]], embeddings[UNK]), "the new rows trained"

    model_dir = export_model(ExportConfig(output=run_dir, base_model=tiny_base))
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == vocab_size
    assert (model_dir / "vocab.txt").read_bytes() == (run_dir / TOKENIZER_DIR / "vocab.txt").read_bytes()
    exported = read_state_dict(model_dir / "model.safetensors")
    base_state = read_state_dict(tiny_base / "pytorch_model.bin")
    assert exported.keys() == base_state.keys()
    assert torch.equal(exported["bert.pooler.dense.weight"], base_state["bert.pooler.dense.weight"])
    assert exported["cls.predictions.decoder.weight"].shape == (vocab_size, 64)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    assert len(tokenizer) == model.config.vocab_size == vocab_size
    ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]
    assert UNK not in ids and {added["“"], added["”"], added["—"]} <= set(ids)
    assert "".join(tokenizer.decode(ids, skip_special_tokens=True).split()) == ROUND_TRIP_TEXT
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), vocab_size) and torch.isfinite(logits).all()
    reference = AutoModelForMaskedLM.from_pretrained(str(tiny_base))
    reference.resize_token_embeddings(vocab_size, mean_resizing=False)
    reference.load_state_dict(read_state_dict(ckpt.step_dir(run_dir, ckpt.best_pointer(run_dir)["step"])
                                              / "model.safetensors"), strict=False)
    with torch.no_grad():
        assert torch.allclose(reference.eval()(input_ids=torch.tensor([ids])).logits, logits, atol=1e-5)

    # `cpt eval` compares the base and its extended export on the same masks and targets
    from cpt.config import EvalConfig
    from cpt.tools.eval import evaluate_models

    settings = EvalConfig(corpus=(str(run_dir / "corpus" / "train.txt"),), max_seq_length=64, max_sequences=16,
                            seed=3, pppl_tokens=60, batch_size=16)
    both = evaluate_models([tiny_base, model_dir], settings)["models"]
    assert both[0]["masked_tokens"] == both[1]["masked_tokens"] > 0
    assert both[0]["pppl_tokens"] == both[1]["pppl_tokens"] == 60
    assert all(math.isfinite(result["mlm_loss"]) for result in both)
    assert evaluate_models([model_dir, tiny_base], settings)["models"][::-1] == [
        {**result, "model": str(path)} for result, path in zip(both, (tiny_base, model_dir), strict=True)]

    # --into-base: the base dir becomes the adapted model, vocab and config included, originals kept; a rerun of
    # the run's stages against it is up to date (the extended base tokenizes as RUN_DIR/tokenizer/ does)
    original_vocab = (tiny_base / "vocab.txt").read_bytes()
    export_model(ExportConfig(output=run_dir, base_model=tiny_base, into_base=True))
    assert (tiny_base / "vocab.txt").read_bytes() == (model_dir / "vocab.txt").read_bytes()
    assert [p.read_bytes() for p in tiny_base.glob("vocab.txt.before-cpt-*")] == [original_vocab]
    assert len(list(tiny_base.glob("config.json.before-cpt-*"))) == 1
    assert AutoModelForMaskedLM.from_pretrained(str(tiny_base)).config.vocab_size == vocab_size
    assert tokenize(run_dir, tiny_base, extend_vocab="auto")["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    train(TrainConfig(output=run_dir, base_model=tiny_base, micro_batch_size=4, global_batch_size=8, max_steps=4,
                      lr=1e-3, warmup_steps=0, eval_interval=2, save_interval=2, eval_max_sequences=8,
                      head_warmup="off"))
    assert export_model(ExportConfig(output=run_dir, base_model=tiny_base)) == model_dir
