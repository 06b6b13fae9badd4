"""The model: loading the base with transformers, the MLM loss on masked positions only, and
`cpt init-base` (a random BERT laid out like the real hfl checkpoint).

    model = load_mlm_model(base_dir, device)                    # BertForMaskedLM, SDPA attention
    loss_sum, correct, count = masked_lm_loss(model, batch)     # head only where labels != -100
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from cpt.common.files import atomic_dir, read_json
from cpt.common.weights import find_weights_file, write_state_dict
from cpt.errors import BadInput, first_line
from cpt.training.mlm_loss import summed_cross_entropy

IGNORE_INDEX = -100

PRESETS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


NO_DECAY_MARKERS = ("bias", "LayerNorm", "layer_norm", "layernorm")  # parameters without weight decay
UER_INIT_DIR = "uer-init"  # RUN_DIR/uer-init/: --init-from-uer converted to a HF dir before training


def asset_path(name: str) -> Path:
    return Path(str(resources.files("cpt") / "assets" / name))


def init_base(output_dir: Path, *, preset: str = "tiny", seed: int = 0, max_position_embeddings: int = 512) -> Path:
    """Write config.json, vocab.txt and pytorch_model.bin (bert.* with pooler, cls.predictions.*,
    cls.seq_relationship.*) of a randomly initialised BERT, like hfl/chinese-roberta-wwm-ext-large."""
    from transformers import BertConfig, BertForPreTraining

    if preset not in PRESETS:
        raise BadInput(f"--preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise BadInput(f"{output_dir} exists and is not empty; init-base only writes into a new directory")
    shape = json.loads(asset_path("roberta_wwm_ext_large_config.json").read_text(encoding="utf-8"))
    shape.update(PRESETS[preset], max_position_embeddings=max_position_embeddings)
    config = BertConfig(**{key: value for key, value in shape.items() if key != "architectures"})
    config.architectures = ["BertForMaskedLM"]
    torch.manual_seed(seed)
    model = BertForPreTraining(config)
    with atomic_dir(output_dir) as tmp:  # an empty output_dir is taken over
        config.to_json_file(str(tmp / "config.json"))
        shutil.copyfile(asset_path("zh_vocab.txt"), tmp / "vocab.txt")
        write_state_dict(model.state_dict(), tmp / "pytorch_model.bin")
    print(f"init-base: {preset} BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}) -> {output_dir}")
    return output_dir


def check_base_model(base_model: Path) -> dict:
    """config.json of the base model, after checking it has weights and an MLM-capable architecture."""
    base_model = Path(base_model)
    config = read_json(base_model / "config.json")
    if config is None:
        raise BadInput(f"--base-model {base_model}: no readable config.json; it must be a Hugging Face model dir")
    find_weights_file(base_model)
    model_type = config.get("model_type")
    if model_type not in ("bert", "roberta", "xlm-roberta", "ernie", "nezha", "megatron-bert"):
        raise BadInput(
            f"--base-model {base_model}: model_type {model_type!r} has no masked-LM head cpt can train; "
            "use a BERT-family checkpoint"
        )
    return config


def load_mlm_model(base_model: Path, device: torch.device | str = "cpu", weights: Path | None = None):
    """The base model as AutoModelForMaskedLM with SDPA attention; `weights` overrides its weights file."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    check_base_model(base_model)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForMaskedLM.from_pretrained(
            str(base_model), attn_implementation="sdpa", local_files_only=True, trust_remote_code=False,
            dtype=torch.float32,
        )
    except Exception as error:  # transformers raises OSError, SafetensorError, UnpicklingError, RuntimeError, ...
        weights_file = find_weights_file(base_model)
        if type(error).__name__ == "UnpicklingError":
            raise BadInput(f"{weights_file}: refused to load (it holds pickled objects, not plain tensors); "
                           "re-save the weights as model.safetensors") from None
        mismatch = _first_shape_mismatch(base_model) if "mismatched_sizes" in str(error) else None
        if mismatch:
            raise BadInput(f"--base-model {base_model}: its weights do not fit config.json ({mismatch}); "
                           "use the config.json that came with these weights") from None
        raise BadInput(f"--base-model {base_model}: cannot load {weights_file.name} as a masked LM ({first_line(error)}); "
                       "is the file corrupt or from another model?") from None
    if weights is not None:
        load_weights_into(model, weights)
    return model.to(device)


def _first_shape_mismatch(base_model: Path) -> str | None:
    """'NAME has shape (a, b) in the weights but (c, d) per config.json', for the first such tensor."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from cpt.common.weights import read_state_dict

    config = AutoConfig.from_pretrained(str(base_model), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        expected = AutoModelForMaskedLM.from_config(config).state_dict()
    for name, tensor in read_state_dict(find_weights_file(base_model)).items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            return (f"{name} has shape {tuple(tensor.shape)} in the weights but {tuple(expected[name].shape)} "
                    "per config.json")
    return None


def load_weights_into(model: torch.nn.Module, weights_path: Path) -> None:
    from cpt.common.weights import read_state_dict

    state = read_state_dict(weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("decoder.weight") and "position_ids" not in key]
    if missing:
        raise BadInput(f"{weights_path}: lacks {len(missing)} model weights (e.g. {missing[0]}); wrong checkpoint?")
    model.tie_weights()


HEAD_ROWS_MULTIPLE = 64  # the prediction head runs on the masked rows padded with zero rows to a multiple of this


def masked_lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     unpad: bool = False, attention=None, metadata: dict[str, torch.Tensor] | None = None):
    """Logits (M, V) at the M positions with a label, and those labels (M,), in row-major order.

    The encoder runs on every real position (on padding too, unless `unpad`), but the prediction
    head (transform + the V-wide decoder) only on masked ones: the same loss as the full head at
    ~1/7 of its cost for 15% masking. `attention`: the unpadded path's varlen kernel (default: by device)."""
    logits, targets = padded_masked_lm_logits(model, input_ids, attention_mask, labels, unpad=unpad, attention=attention,
                                              metadata=metadata)
    return logits[: targets.shape[0]], targets


def padded_masked_lm_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                            unpad: bool = False, attention=None, metadata: dict[str, torch.Tensor] | None = None):
    """As masked_lm_logits, but the logits keep the head's padding rows: (P, V), P >= M, the M masked rows first.

    `metadata`: the batch's `cpt.training.unpadded.unpadding_metadata`, built by the loader; with it the step gathers
    with index_select and needs no host-device sync (without it, the unpadded path computes it here)."""
    if unpad:
        from cpt.training.unpadded import unpadded_encoder, unpadding_metadata

        metadata = metadata or unpadding_metadata(attention_mask, labels)
        hidden = unpadded_encoder(model.base_model, input_ids, metadata, attention)  # (N, H)
        masked_hidden = hidden.index_select(0, metadata["masked_token_index"])  # (M, H)
        targets = metadata["masked_labels"]
    else:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if metadata is None:
            selected = labels != IGNORE_INDEX  # (B, T)
            masked_hidden, targets = hidden[selected], labels[selected]  # (M, H), (M,)
        else:
            masked_hidden = hidden.flatten(0, 1).index_select(0, metadata["masked_index"])
            targets = metadata["masked_labels"]
    rows = masked_hidden.shape[0]
    # M changes every step; a few distinct shapes keep oneDNN's per-shape kernel cache (CPU, bf16) small.
    padded_rows = -(-rows // HEAD_ROWS_MULTIPLE) * HEAD_ROWS_MULTIPLE
    logits = _mlm_head(model)(F.pad(masked_hidden, (0, 0, 0, padded_rows - rows)))  # (P, V)
    return logits, targets


def _mlm_head(model) -> torch.nn.Module:
    """The prediction head module of a BERT-family masked LM (transform + decoder)."""
    for name in ("cls", "lm_head"):
        if hasattr(model, name):
            return getattr(model, name)
    raise BadInput(f"{type(model).__name__} has no masked-LM head (cls/lm_head)")


def masked_lm_loss(model, input_ids, attention_mask, labels, unpad: bool = False, attention=None,
                   metadata: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (a scalar), number of correct predictions and of masked positions."""
    # The padding rows go in too: slicing them off first cost a (P, V) zero-fill and copy in the backward.
    logits, targets = padded_masked_lm_logits(model, input_ids, attention_mask, labels, unpad=unpad,
                                              attention=attention, metadata=metadata)
    loss_sum, correct = summed_cross_entropy(logits, targets)  # fp32 math; one pass instead of log_softmax + argmax
    # A fill on the device, not torch.tensor(n, device=...): a copy from pageable host memory waits for the GPU.
    return loss_sum, correct, torch.full((), targets.numel(), dtype=torch.int64, device=targets.device)


class MaskedLMObjective(torch.nn.Module):
    """Wraps the model so DDP sees one forward: batch -> (loss_sum, correct, masked_count)."""

    def __init__(self, model: torch.nn.Module, unpad: bool = False):
        super().__init__()
        self.model = model
        self.unpad = unpad

    def forward(self, input_ids, attention_mask, labels, **metadata):
        """`metadata`: the batch's unpadding_metadata when the loader built it (training batches do): the step
        then takes the masked rows with index_select instead of a boolean mask (a host-device sync on CUDA)."""
        return masked_lm_loss(self.model, input_ids, attention_mask, labels, unpad=self.unpad,
                              metadata=metadata or None)


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     only: Iterable[torch.nn.Parameter] | None = None) -> list[dict]:
    """AdamW's two groups: weights with `weight_decay`, biases and LayerNorm (NO_DECAY_MARKERS) without; over
    the model's trainable parameters, or over `only` (e.g. the head warm-up's), in the model's order."""
    chosen = None if only is None else {id(parameter) for parameter in only}
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad if chosen is None else id(parameter) in chosen:
            (no_decay if any(marker in name for marker in NO_DECAY_MARKERS) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- an extended vocab (--extend-vocab) ----------------------------------------------------------------

def resize_for_extension(model, shards_manifest: dict) -> None:
    """Grow the word embeddings, the (tied) decoder and the output bias to the extended vocab (--extend-vocab);
    new rows as cpt/data/vocab.py's docstring says. Runs on the base weights, before a checkpoint is loaded
    over them."""
    from cpt.data.vocab import added_tokens

    tokens = added_tokens(shards_manifest)
    if not tokens:
        return
    extension = shards_manifest["vocab_extension"]
    rows = model.get_input_embeddings().num_embeddings
    if rows == extension["vocab_size"]:
        return
    if rows != extension["base_vocab_size"]:
        raise BadInput(f"the model has {rows} word embeddings but the shards' tokenizer extends a vocab of "
                       f"{extension['base_vocab_size']}; use the base model the run was tokenized for")
    model.resize_token_embeddings(extension["vocab_size"], mean_resizing=False)
    init_new_rows(model, tokens, extension["unk_token_id"])


def init_new_rows(model, tokens: list[dict], unk_token_id: int) -> None:
    embedding = model.get_input_embeddings().weight  # (V', H)
    output = model.get_output_embeddings()
    bias = getattr(output, "bias", None)  # (V',) BERT's cls.predictions.bias (the decoder's bias is the same tensor)
    from_unk = [token for token in tokens if token["base_pieces"] == [unk_token_id]]
    unk_total = sum(token["count"] + 1 for token in from_unk)
    with torch.no_grad():
        for token in tokens:
            pieces = torch.tensor(token["base_pieces"] or [unk_token_id], dtype=torch.long)
            embedding[token["id"]] = embedding[pieces].mean(dim=0)
            if output is not None and output.weight is not embedding:  # untied decoder
                output.weight[token["id"]] = output.weight[pieces].mean(dim=0)
            if bias is not None:
                if token in from_unk:
                    bias[token["id"]] = bias[unk_token_id] + math.log((token["count"] + 1) / unk_total)
                else:
                    bias[token["id"]] = bias[pieces].mean()
