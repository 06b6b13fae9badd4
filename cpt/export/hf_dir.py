"""Base model dir + a state dict -> a Hugging Face model dir, written atomically: what `cpt export` and
`cpt convert --from uer --to hf` share.

    write_hf_dir(run_dir / "model", base_dir, merged, weight_format="safetensors",
                 verify=check_logits, replace=True)                           # export: replaces its last export
    write_hf_dir(output_dir, base_dir, state, base_files=config_and_tokenizer,
                 config_updates={"tie_word_embeddings": False})               # convert: a new dir only

The dir holds the base's files (every one but its weights in any format, or the `base_files` named), the
`tokenizer_files` given in place of the base's files of the same name (an extended vocab), config.json
with `config_updates` applied (copied byte for byte when there are none), and `state` in each weight
format. It is filled in the hidden sibling .NAME.tmp, `verify(tmp)` runs on it there, and only then does
it become `target` (cpt.common.files.atomic_dir): a failure or a kill at any point leaves `target` as it
was. `replace=True` swaps out a previous dir; without it, a non-empty `target` raises FileExistsError.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cpt.common.files import atomic_dir, read_json, write_json_atomic
from cpt.common.weights import WEIGHT_FILE_NAMES, write_state_dict
from cpt.errors import BadInput

CONFIG_FILE = "config.json"
WEIGHT_FORMATS = {"safetensors": ("model.safetensors",), "bin": ("pytorch_model.bin",),
                  "both": ("model.safetensors", "pytorch_model.bin")}
BASE_WEIGHT_FILES = frozenset(WEIGHT_FILE_NAMES) | {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
# Files that hold weights or training state of some framework: in a base dir they hold the *base's* weights
# (the hub repo of hfl/chinese-roberta-wwm-ext-large has tf_model.h5 and flax_model.msgpack beside
# pytorch_model.bin), so beside the trained weights they would hand a TensorFlow / Flax / Rust user the
# untrained model, silently. Matched by suffix, plus TF checkpoints (bert_model.ckpt.index, .data-*, .meta).
WEIGHT_SUFFIXES = frozenset({".bin", ".safetensors", ".h5", ".msgpack", ".ot", ".onnx", ".pt", ".pth", ".ckpt",
                             ".gguf", ".tflite", ".npz", ".pdparams", ".pdopt", ".keras", ".pb"})
WEIGHT_NAMES = frozenset({"checkpoint"})  # TF's checkpoint index file
WEIGHT_INDEX_SUFFIXES = (".h5.index.json", ".msgpack.index.json", ".safetensors.index.json", ".bin.index.json")


BACKUP_MARK = ".before-cpt-"  # NAME.before-cpt-STAMP: an original that `cpt export --into-base` kept


def holds_weights(name: str) -> bool:
    """Whether a file of a model dir holds weights or training state (any framework), by its name."""
    return (name in BASE_WEIGHT_FILES or name in WEIGHT_NAMES or Path(name).suffix in WEIGHT_SUFFIXES or ".ckpt" in name
            or name.endswith(WEIGHT_INDEX_SUFFIXES))


def non_weight_files(base_dir: Path) -> list[str]:
    """The names of the base dir's files that travel with new weights by default: config, tokenizer, card,
    licence; not its weights in any format, the originals --into-base kept, nor hidden files."""
    return [item.name for item in sorted(Path(base_dir).iterdir())
            if item.is_file() and not holds_weights(item.name) and BACKUP_MARK not in item.name
            and not item.name.startswith(".")]


def stray_files(model_dir: Path) -> list[str]:
    """Files an export no longer writes that an older cpt's export may hold: other formats' weights, the
    originals --into-base kept."""
    return [item.name for item in sorted(Path(model_dir).iterdir())
            if item.is_file() and ((holds_weights(item.name) and item.name not in BASE_WEIGHT_FILES)
                                   or BACKUP_MARK in item.name)]


def other_weight_files(base_dir: Path) -> list[str]:
    """The base dir's weight files in other formats than cpt reads and writes (tf_model.h5, flax_model.msgpack,
    TF checkpoints, ...): the base's weights, which an export leaves out and --into-base leaves stale."""
    return [item.name for item in sorted(Path(base_dir).iterdir())
            if item.is_file() and holds_weights(item.name) and item.name not in BASE_WEIGHT_FILES
            and not item.name.startswith(".") and BACKUP_MARK not in item.name]


def write_hf_dir(target: Path, base_dir: Path, state: dict[str, torch.Tensor], *, weight_format: str = "both",
                 base_files: Iterable[str] | None = None, tokenizer_files: Iterable[Path] = (),
                 config_updates: dict | None = None, verify: Callable[[Path], None] | None = None,
                 replace: bool = False) -> Path:
    """Write `target` as the module docstring says; returns it."""
    target, base_dir = Path(target), Path(base_dir)
    sources = {name: base_dir / name for name in (non_weight_files(base_dir) if base_files is None else base_files)
               if (base_dir / name).is_file()}
    sources.update({Path(path).name: Path(path) for path in tokenizer_files})
    config = None
    if config_updates:
        config = read_json(base_dir / CONFIG_FILE)
        if not isinstance(config, dict):
            raise BadInput(f"{base_dir / CONFIG_FILE}: missing or not a JSON object; restore the base model's config")
        config.update(config_updates)
        sources.pop(CONFIG_FILE, None)
    with atomic_dir(target, replace=replace) as tmp:
        for name, source in sources.items():
            shutil.copyfile(source, tmp / name)
        if config is not None:
            write_json_atomic(tmp / CONFIG_FILE, config)
        for name in WEIGHT_FORMATS[weight_format]:
            write_state_dict(state, tmp / name)
        if verify is not None:
            verify(tmp)
    return target
