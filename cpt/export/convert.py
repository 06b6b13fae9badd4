"""Convert BERT checkpoints between UER-py and Hugging Face layouts.

    cpt convert --from uer --to hf --base-model BASE_DIR uer_model.bin OUT_DIR
    cpt convert --from hf --to uer --target mlm HF_DIR uer_model.bin

UER-py -> HF writes a complete model dir: config and tokenizer files copied from the base model,
weights as `model.safetensors` and `pytorch_model.bin` with every key of the base checkpoint. Keys
the UER file does not carry (the pooler and NSP head of an `mlm`-target model) come from the base
unchanged, so the result drops in wherever the base model was used. HF -> UER writes one
`torch.save` state dict that UER-py's `--pretrained_model_path` loads.

The key names follow UER-py's scripts/convert_bert_{from_uer_to_huggingface,
from_huggingface_to_uer}.py, in all three generations UER-py has written (newest first):
`embedding.word.embedding` / `embedding.word_embedding`, `target.mlm.linear_1` /
`target.mlm_linear_1`, `target.sp.linear_1` / `target.sp_linear_1` / `target.nsp_linear_1`, ...
UER's segment embedding has 3 rows: row 0 is for padding, rows 1 and 2 are HF's token types 0 and 1.

The layer count is read from the weights, never from a flag. UER checkpoints are pickles: they are
read only through `cpt.common.weights.read_state_dict` (plain tensors, `weights_only=True`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt.common.base_model import TOKENIZER_FILES
from cpt.common.weights import find_weights_file, read_state_dict, write_state_dict
from cpt.errors import BadInput, UsageError
from cpt.export.hf_dir import write_hf_dir

UER_TARGETS = ("auto", "mlm", "bert")
HF_TO_UER_TARGETS = ("mlm", "bert")

CONFIG_FILE = "config.json"

HF_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
HF_POSITION_EMBEDDINGS = "bert.embeddings.position_embeddings.weight"
HF_TOKEN_TYPE_EMBEDDINGS = "bert.embeddings.token_type_embeddings.weight"
HF_DECODER_WEIGHT = "cls.predictions.decoder.weight"
HF_DECODER_BIAS = "cls.predictions.decoder.bias"
HF_MLM_BIAS = "cls.predictions.bias"

StateDict = dict[str, torch.Tensor]
Pair = tuple[str, tuple[str, ...]]
"""(HF key, UER names newest first): hf_to_uer writes the first name, uer_to_hf accepts any one."""

LINEAR = (("weight", "weight"), ("bias", "bias"))
LAYER_NORM = (("weight", "gamma"), ("bias", "beta"))  # UER's own LayerNorm names its parameters gamma/beta


def _params(hf_module: str, uer_modules: tuple[str, ...], params=LINEAR) -> tuple[Pair, ...]:
    return tuple((f"{hf_module}.{hf}", tuple(f"{m}.{uer}" for m in uer_modules)) for hf, uer in params)


EMBEDDING_KEYS: tuple[Pair, ...] = (
    (HF_WORD_EMBEDDINGS, ("embedding.word.embedding.weight", "embedding.word_embedding.weight")),
    (HF_POSITION_EMBEDDINGS, ("embedding.pos.embedding.weight", "embedding.position_embedding.weight")),
    # UER rows: [padding, segment A, segment B]; HF rows: [type 0, type 1].
    (HF_TOKEN_TYPE_EMBEDDINGS, ("embedding.seg.embedding.weight", "embedding.segment_embedding.weight")),
    *_params("bert.embeddings.LayerNorm", ("embedding.layer_norm",), LAYER_NORM),
)

# Per layer: (HF module under bert.encoder.layer.{i}, UER module under encoder.transformer.{i}, params).
LAYER_MODULES = (
    ("attention.self.query", "self_attn.linear_layers.0", LINEAR),
    ("attention.self.key", "self_attn.linear_layers.1", LINEAR),
    ("attention.self.value", "self_attn.linear_layers.2", LINEAR),
    ("attention.output.dense", "self_attn.final_linear", LINEAR),
    ("attention.output.LayerNorm", "layer_norm_1", LAYER_NORM),
    ("intermediate.dense", "feed_forward.linear_1", LINEAR),
    ("output.dense", "feed_forward.linear_2", LINEAR),
    ("output.LayerNorm", "layer_norm_2", LAYER_NORM),
)

MLM_KEYS: tuple[Pair, ...] = (
    *_params("cls.predictions.transform.dense", ("target.mlm.linear_1", "target.mlm_linear_1")),
    *_params("cls.predictions.transform.LayerNorm", ("target.mlm.layer_norm", "target.layer_norm"), LAYER_NORM),
    # The decoder: HF keeps its bias one level up, as cls.predictions.bias (decoder.bias mirrors it).
    (HF_DECODER_WEIGHT, ("target.mlm.linear_2.weight", "target.mlm_linear_2.weight")),
    (HF_MLM_BIAS, ("target.mlm.linear_2.bias", "target.mlm_linear_2.bias")),
)

# UER's sentence-prediction target: linear_1 is BERT's pooler, linear_2 the NSP classifier.
SP_KEYS: tuple[Pair, ...] = (
    *_params("bert.pooler.dense", ("target.sp.linear_1", "target.sp_linear_1", "target.nsp_linear_1")),
    *_params("cls.seq_relationship", ("target.sp.linear_2", "target.sp_linear_2", "target.nsp_linear_2")),
)
SP_HF_KEYS = frozenset(hf for hf, _ in SP_KEYS)
SP_UER_NAMES = frozenset(name for _, names in SP_KEYS for name in names)

UER_PADDING_SEGMENTS = 1
"""Rows of UER's segment embedding before HF's token types: row 0, which embeds padding."""

UER_LAYER = re.compile(r"^encoder\.transformer\.(\d+)\.")
HF_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion did, for the CLI to print."""

    layers: int
    """Transformer layers found in the input weights."""
    written: Path
    """The output: a model dir (uer_to_hf) or a weights file (hf_to_uer)."""
    keys_from_base: tuple[str, ...]
    """HF keys copied unchanged from the base model because the UER file has no value for them."""
    keys_left_out: tuple[str, ...]
    """Input keys with no place in the output (e.g. the pooler and NSP head for target mlm)."""


@dataclass(frozen=True)
class Conversion:
    """A state dict mapped to the other layout, before anything is written."""

    layers: int
    """Transformer layers found in the input weights."""
    state: StateDict
    """The output's tensors under the output layout's names, in checkpoint order."""
    keys_from_base: tuple[str, ...] = ()
    """HF keys copied unchanged from the base model (uer_to_hf only)."""
    keys_left_out: tuple[str, ...] = ()
    """Input keys with no place in the output."""
    config_updates: dict | None = None
    """Changes to the base's config.json that the output needs (uer_to_hf only); None: copy it as is."""

    def report(self, written: Path) -> ConvertReport:
        return ConvertReport(self.layers, written, self.keys_from_base, self.keys_left_out)


def key_pairs(layers: int, *, with_sp: bool) -> list[Pair]:
    """Every (HF key, UER names) pair of a BERT with `layers` layers, in checkpoint order."""
    pairs = list(EMBEDDING_KEYS)
    for i in range(layers):
        pairs += _layer_key_pairs(i)
    pairs += MLM_KEYS
    if with_sp:
        pairs += SP_KEYS
    return pairs


def _layer_key_pairs(layer: int) -> list[Pair]:
    """The (HF key, UER name) pairs of transformer layer `layer` (0-based), from LAYER_MODULES."""
    return [
        pair
        for hf_module, uer_module, params in LAYER_MODULES
        for pair in _params(f"bert.encoder.layer.{layer}.{hf_module}", (f"encoder.transformer.{layer}.{uer_module}",), params)
    ]


# Stages: read the inputs, map the state dict (pure), write the output.


def uer_to_hf(uer_file: Path, base_model_dir: Path, output_dir: Path, *, target: str = "auto") -> ConvertReport:
    """Write a Hugging Face model dir from a UER-py BERT checkpoint and the HF model it started from.

    `target` is the UER training target: "mlm" (no NSP head: the pooler and NSP head come from the
    base), "bert" (MLM + NSP, all from the UER file) or "auto" (bert when `target.sp.*` is there).
    Tensors are cast to the base's dtype. If the UER decoder is not tied to the word embeddings,
    the written config says `tie_word_embeddings: false` so transformers keeps both.
    """
    _check_target(target, UER_TARGETS)
    uer_file, base_model_dir, output_dir = Path(uer_file), Path(base_model_dir), Path(output_dir)
    _refuse_non_empty_dir(output_dir)
    config = _read_config(base_model_dir)
    base = read_state_dict(find_weights_file(base_model_dir))
    uer = read_state_dict(uer_file)
    conversion = uer_state_to_hf(uer, base, config, target=target, uer_file=uer_file, base_model_dir=base_model_dir)
    _write_model_dir(output_dir, base_model_dir, conversion.state, conversion.config_updates)
    return conversion.report(output_dir)


def hf_to_uer(hf_dir: Path, output_file: Path, *, target: str = "mlm") -> ConvertReport:
    """Write a UER-py BERT checkpoint (newest key names) from a Hugging Face BERT model dir.

    `target` "mlm" writes the encoder and MLM head; "bert" adds `target.sp.*` from the pooler and NSP
    head. The report lists the HF keys that were left out.
    """
    _check_target(target, HF_TO_UER_TARGETS)
    hf_dir, output_file = Path(hf_dir), Path(output_file)
    _refuse_uer_output_file(output_file)
    config = _read_config(hf_dir) if (hf_dir / CONFIG_FILE).is_file() else {}
    weights_file = find_weights_file(hf_dir)
    hf = read_state_dict(weights_file)
    conversion = hf_state_to_uer(hf, config, with_sp=target == "bert", weights_file=weights_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    write_state_dict(conversion.state, output_file)
    return conversion.report(output_file)


# UER -> HF, pure: the paths only name the inputs in error messages.


def uer_state_to_hf(
    uer: StateDict, base: StateDict, config: dict, *, target: str, uer_file: Path, base_model_dir: Path
) -> Conversion:
    """The base's state dict with every tensor the UER checkpoint has a value for replaced; BadInput on a misfit."""
    _check_looks_like_uer(uer, uer_file)
    layers = _count_layers(uer, UER_LAYER)
    with_sp = any(name in SP_UER_NAMES for name in uer) if target == "auto" else target == "bert"
    values, uer_name_of, left_out = _collect_uer(uer, uer_file, layers, with_sp=with_sp)
    _check_layer_count(layers, config, uer_file, base_model_dir)
    base_key_of = {_canonical(key): key for key in base}
    _check_shapes(values, uer_name_of, base, base_key_of, uer_file, base_model_dir)

    values = _as_hf_values(values)
    decoder_tied = torch.equal(values[HF_DECODER_WEIGHT], values[HF_WORD_EMBEDDINGS])
    config_ties = bool(config.get("tie_word_embeddings", True))
    state, keys_from_base = _replace_base_values(base, values, base_key_of, ties=config_ties and decoder_tied)
    return Conversion(
        layers=layers,
        state=state,
        keys_from_base=tuple(keys_from_base),
        keys_left_out=tuple(left_out + _uer_names_without_place(uer_name_of, base_key_of)),
        config_updates={"tie_word_embeddings": False} if config_ties and not decoder_tied else None,
    )


def _as_hf_values(values: StateDict) -> StateDict:
    """HF key -> UER tensor, laid out as HF holds it: token types without UER's padding row, decoder.bias too."""
    return {
        **values,
        HF_TOKEN_TYPE_EMBEDDINGS: _token_types_from_segments(values[HF_TOKEN_TYPE_EMBEDDINGS]),
        HF_DECODER_BIAS: values[HF_MLM_BIAS],  # HF keeps the decoder's bias twice; both are the same tensor
    }


def _replace_base_values(
    base: StateDict, values: StateDict, base_key_of: dict[str, str], *, ties: bool
) -> tuple[StateDict, list[str]]:
    """`base` with its tensors replaced by `values` (cast to the base's dtype), and the base keys kept as they were.

    `ties`: whether the output ties the decoder to the word embeddings; if not and the base has no
    decoder weight (save_pretrained drops a tied one), the UER decoder is added after the base's keys.
    """
    state: StateDict = {}
    keys_from_base = []
    for key, tensor in base.items():
        canonical = _canonical(key)
        if canonical in values:
            state[key] = values[canonical].to(tensor.dtype)
        else:
            state[key] = tensor
            keys_from_base.append(key)
    if HF_DECODER_WEIGHT not in base_key_of and not ties:
        state[HF_DECODER_WEIGHT] = values[HF_DECODER_WEIGHT].to(state[base_key_of[HF_WORD_EMBEDDINGS]].dtype)
    return state, keys_from_base


def _uer_names_without_place(uer_name_of: dict[str, str], base_key_of: dict[str, str]) -> list[str]:
    """UER names of the tensors the base has no place for, e.g. the NSP head when the base is BertForMaskedLM."""
    mirrors = (HF_DECODER_WEIGHT, HF_DECODER_BIAS)  # a base may drop these and still take their values
    return [uer_name for hf_key, uer_name in uer_name_of.items() if hf_key not in base_key_of and hf_key not in mirrors]


# HF -> UER, pure: the path only names the input in error messages.


def hf_state_to_uer(hf: StateDict, config: dict, *, with_sp: bool, weights_file: Path) -> Conversion:
    """The UER-py state dict (newest names) of a HF BERT state dict; BadInput if it is not one."""
    key_of = {_canonical(key): key for key in hf}
    _check_looks_like_hf(key_of, hf, weights_file)
    layers = _count_layers(key_of, HF_LAYER)
    source_of = _hf_sources(key_of, config)
    pairs = key_pairs(layers, with_sp=with_sp)
    _check_hf_complete(pairs, source_of, weights_file)

    values = {hf_key: hf[source_of[hf_key]] for hf_key, _ in pairs}
    values[HF_TOKEN_TYPE_EMBEDDINGS] = _segments_from_token_types(values[HF_TOKEN_TYPE_EMBEDDINGS])
    mirrors = {key_of[key] for key in (HF_DECODER_WEIGHT, HF_DECODER_BIAS) if key in key_of}
    used = {source_of[hf_key] for hf_key, _ in pairs} | mirrors
    return Conversion(
        layers=layers,
        state={uer_names[0]: values[hf_key] for hf_key, uer_names in pairs},
        keys_left_out=tuple(key for key in hf if key not in used),
    )


def _hf_sources(key_of: dict[str, str], config: dict) -> dict[str, str]:
    """HF key -> the checkpoint key to read its value from, mirrors resolved.

    decoder.weight and decoder.bias mirror the word embeddings and cls.predictions.bias: a checkpoint
    may lack the mirrors, and an older one may hold the MLM bias only as decoder.bias.
    """
    source_of = dict(key_of)
    # HF computes MLM logits with the word embeddings when they are tied, whatever decoder.weight says.
    if config.get("tie_word_embeddings", True) or HF_DECODER_WEIGHT not in source_of:
        source_of[HF_DECODER_WEIGHT] = source_of.get(HF_WORD_EMBEDDINGS, HF_WORD_EMBEDDINGS)
    if HF_MLM_BIAS not in source_of and HF_DECODER_BIAS in source_of:
        source_of[HF_MLM_BIAS] = source_of[HF_DECODER_BIAS]
    return source_of


# UER's segment embedding has rows [padding, segment A, segment B]; HF's token types are [type 0, type 1].


def _token_types_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """(3, H) UER segment rows -> (2, H) HF token types: row 0 only ever embeds padding."""
    return segments[UER_PADDING_SEGMENTS:].clone()


def _segments_from_token_types(token_types: torch.Tensor) -> torch.Tensor:
    """(2, H) HF token types -> (3, H) UER segment rows, with a zero padding row first."""
    padding_rows = torch.zeros_like(token_types[:UER_PADDING_SEGMENTS])
    return torch.cat([padding_rows, token_types])


# Checks: each raises a one-line BadInput or UsageError that says what to do.


def _check_target(target: str, choices: tuple[str, ...]) -> None:
    if target not in choices:
        raise UsageError(f"--target {target!r}: choose one of {', '.join(choices)}")


def _refuse_uer_output_file(output_file: Path) -> None:
    if output_file.exists():
        raise BadInput(f"{output_file}: already exists; remove it or choose another output file")
    if output_file.suffix == ".safetensors":
        raise BadInput(f"{output_file}: UER-py loads checkpoints with torch.load; name the output *.bin")


def _check_looks_like_hf(key_of: dict[str, str], hf: StateDict, weights_file: Path) -> None:
    if not any(HF_LAYER.match(key) for key in key_of):
        hint = "; it looks like a UER-py checkpoint, convert --from uer" if any(UER_LAYER.match(k) for k in hf) else ""
        raise BadInput(f"{weights_file}: no bert.encoder.layer.* keys, not a Hugging Face BERT checkpoint{hint}")


def _check_hf_complete(pairs: list[Pair], source_of: dict[str, str], weights_file: Path) -> None:
    missing = [hf_key for hf_key, _ in pairs if hf_key not in source_of]
    if missing:
        fix = "use --target mlm" if set(missing) <= SP_HF_KEYS else "convert a BertForPreTraining/BertForMaskedLM model"
        raise BadInput(f"{weights_file}: missing {_some(missing)}; {fix}")


def _check_layer_count(layers: int, config: dict, uer_file: Path, base_model_dir: Path) -> None:
    base_layers = config.get("num_hidden_layers")
    if base_layers != layers:
        raise BadInput(
            f"{uer_file}: has {layers} transformer layers but the base model {base_model_dir} has {base_layers}; "
            "use the base model this UER model was trained from"
        )


def _collect_uer(
    uer: dict[str, torch.Tensor], uer_file: Path, layers: int, *, with_sp: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """HF key -> UER tensor, HF key -> UER name, and the UER names left out; BadInput on bad keys."""
    values: dict[str, torch.Tensor] = {}
    uer_name_of: dict[str, str] = {}
    claimed: set[str] = set()
    missing, ambiguous, left_out = [], [], []
    for hf_key, names in key_pairs(layers, with_sp=True):
        found = [name for name in names if name in uer]
        claimed.update(found)
        if hf_key in SP_HF_KEYS and not with_sp:
            left_out += found
        elif not found:
            missing.append(names[0])
        elif len(found) > 1:
            ambiguous.append(" and ".join(found))
        else:
            values[hf_key], uer_name_of[hf_key] = uer[found[0]], found[0]
    unknown = [name for name in uer if name not in claimed]
    if unknown:
        raise BadInput(
            f"{uer_file}: unknown keys {_some(unknown)}; only UER-py BERT models "
            "(embedding word+pos+seg, post-LN transformer encoder, mlm or bert target) can be converted"
        )
    if missing:
        fix = "convert with --target mlm" if set(missing) <= SP_UER_NAMES else "is the file truncated? save it again"
        raise BadInput(f"{uer_file}: missing keys {_some(missing)}; {fix}")
    if ambiguous:
        raise BadInput(f"{uer_file}: both old and new UER names for {_some(ambiguous)}; keep one of each pair")
    return values, uer_name_of, left_out


def _check_shapes(
    values: dict[str, torch.Tensor],
    uer_name_of: dict[str, str],
    base: dict[str, torch.Tensor],
    base_key_of: dict[str, str],
    uer_file: Path,
    base_model_dir: Path,
) -> None:
    """BadInput unless every UER tensor fits the base tensor it replaces."""
    optional = SP_HF_KEYS | {HF_DECODER_WEIGHT}
    absent = [hf_key for hf_key in values if hf_key not in base_key_of and hf_key not in optional]
    if absent:
        raise BadInput(
            f"{base_model_dir}: base weights lack {_some(absent)}; use a BertForMaskedLM/BertForPreTraining model dir"
        )
    mismatched = []
    for hf_key, tensor in values.items():
        # Checkpoints saved by save_pretrained drop the decoder weight tied to the word embeddings.
        base_key = base_key_of.get(hf_key) or (base_key_of[HF_WORD_EMBEDDINGS] if hf_key == HF_DECODER_WEIGHT else None)
        if base_key is None:
            continue
        expected = tuple(base[base_key].shape)
        if hf_key == HF_TOKEN_TYPE_EMBEDDINGS:
            expected = (expected[0] + UER_PADDING_SEGMENTS, *expected[1:])
        if tuple(tensor.shape) != expected:
            mismatched.append(f"{uer_name_of[hf_key]} {tuple(tensor.shape)} vs {expected}")
    if mismatched:
        raise BadInput(
            f"{uer_file}: shapes differ from the base model {base_model_dir}: {_some(mismatched)}; "
            "use the base model this UER model was trained from (same hidden size, vocab, positions)"
        )


def _check_looks_like_uer(state: dict[str, torch.Tensor], path: Path) -> None:
    if any(UER_LAYER.match(key) for key in state):
        return
    if any(HF_LAYER.match(key) for key in state):
        raise BadInput(f"{path}: this is a Hugging Face checkpoint, not UER-py; convert --from hf, or use it directly")
    raise BadInput(
        f"{path}: no encoder.transformer.* keys (first keys: {_some(list(state))}); not a UER-py BERT checkpoint"
    )


def _count_layers(keys, pattern: re.Pattern[str]) -> int:
    """1 + the highest layer index in `keys`; a gap shows up later as missing keys."""
    indices = [int(match.group(1)) for key in keys if (match := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def _canonical(hf_key: str) -> str:
    """The current name of a HF key; checkpoints converted from TF may say LayerNorm.gamma/beta."""
    if hf_key.endswith("LayerNorm.gamma"):
        return hf_key[: -len("gamma")] + "weight"
    if hf_key.endswith("LayerNorm.beta"):
        return hf_key[: -len("beta")] + "bias"
    return hf_key


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} (+{len(items) - limit} more)" if len(items) > limit else shown


def _read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{model_dir}: no {CONFIG_FILE}; point --base-model at a Hugging Face model dir") from None
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: unreadable ({type(error).__name__}); restore the base model's config.json") from None
    if not isinstance(config, dict) or config.get("model_type", "bert") != "bert":
        raise BadInput(f"{path}: not a BERT config (model_type {config.get('model_type')!r}); use a BERT base model")
    return config


def _refuse_non_empty_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise BadInput(f"{output_dir}: exists and is not an empty dir; remove it or choose another output dir")


def _write_model_dir(
    output_dir: Path, base_model_dir: Path, state: dict[str, torch.Tensor], config_updates: dict | None
) -> None:
    """Config + tokenizer of the base, and `state` in both weight formats, into `output_dir` atomically."""
    try:
        write_hf_dir(output_dir, base_model_dir, state, base_files=(CONFIG_FILE, *TOKENIZER_FILES),
                     config_updates=config_updates)
    except FileExistsError:
        raise BadInput(f"{output_dir}: appeared while converting; remove it or choose another output dir") from None
