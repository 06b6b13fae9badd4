"""Safe reading and atomic writing of weight files (safetensors or `torch.load(weights_only=True)`).

cpt never unpickles arbitrary objects: `.bin`/`.pt` files are read with `weights_only=True`, and
safetensors files are preferred whenever a directory has both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cpt.common.files import atomic_path
from cpt.errors import BadInput, first_line

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


def find_weights_file(model_dir: Path) -> Path:
    """The weights file of a Hugging Face model directory, safetensors first."""
    for name in WEIGHT_FILE_NAMES:
        path = Path(model_dir) / name
        if path.is_file():
            return path
    if (Path(model_dir) / "model.safetensors.index.json").is_file() or (
        Path(model_dir) / "pytorch_model.bin.index.json"
    ).is_file():
        raise BadInput(f"{model_dir}: sharded checkpoints are not supported yet; save the model unsharded")
    raise BadInput(
        f"{model_dir}: no model.safetensors or pytorch_model.bin; point --base-model at a Hugging Face model dir"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, on the CPU; a one-line BadInput if it is unreadable."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise BadInput(f"{path}: cannot read weights ({first_line(error)}); the file is corrupt or not a checkpoint") from None
    except Exception as error:  # weights_only refuses pickled objects with UnpicklingError and friends
        raise BadInput(
            f"{path}: refused to load ({type(error).__name__}); cpt only loads plain tensors, re-save as safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{path}: not a state dict of tensors; save it with torch.save(model.state_dict())")
    return state


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy where no two tensors share storage (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[name] = tensor.contiguous()
    return out


def write_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write weights atomically (cpt.common.files.atomic_path); format from the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(untie(state), str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, str(tmp))
