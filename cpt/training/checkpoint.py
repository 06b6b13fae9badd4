"""Checkpoints: RUN_DIR/checkpoints/step-NNNNNNNN/ with model, optimizer, RNG and training state.

    step-00010000/
      model.safetensors   the trained model's weights (transformers key names)
      optimizer.pt        AdamW state (plain tensors: loads with weights_only=True)
      rng.pt              torch CPU/CUDA generator states
      state.json          TrainState, the run record (full config, cpt version, data fingerprints,
                          metrics: cpt/training/resume.py) and each file's size: written last

A checkpoint is written into .step-N.tmp/ and renamed (cpt.common.files.atomic_dir); it is valid
only when state.json parses and every file it lists has the recorded size, so a kill mid-write
never yields a checkpoint that loads. "latest" is the newest valid step dir; "best" is RUN_DIR/best.json, a separate pointer.
Pruning keeps the newest --keep-checkpoints plus the best, and never touches anything else.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cpt.common.files import atomic_dir, read_json, write_json_atomic
from cpt.common.runtime import warn
from cpt.common.weights import read_state_dict, write_state_dict
from cpt.errors import BadInput
from cpt.training.batches import SamplerState
from cpt.training.head_warmup import HeadPhaseState

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    sampler: SamplerState = field(default_factory=SamplerState)
    elapsed_s: float = 0.0
    head: HeadPhaseState = field(default_factory=HeadPhaseState)

    @property
    def phase(self) -> str:
        """The phase the next step belongs to: head (warm-up, head alone) or full (the whole model)."""
        return "head" if self.head.active else "full"

    def state_dict(self) -> dict:
        record = asdict(self)
        record["sampler"] = self.sampler.state_dict()
        record["head"] = self.head.state_dict()
        return record

    @classmethod
    def from_state_dict(cls, record: dict) -> TrainState:
        return cls(step=int(record["step"]), tokens_seen=int(record["tokens_seen"]),
                   sampler=SamplerState.from_state_dict(record["sampler"]), elapsed_s=float(record["elapsed_s"]),
                   head=HeadPhaseState.from_state_dict(record.get("head")))


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, run_record: dict) -> Path:
    """Write step-N/ atomically; returns its path (an existing valid one is kept as is)."""
    final = step_dir(run_dir, state.step)
    if is_valid_checkpoint(final):
        return final
    # An invalid step-N/ is the leftover of an earlier attempt at this step: cpt's own, replaced.
    with atomic_dir(final, replace=True) as tmp:
        write_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack([state.cpu() for state in torch.cuda.get_rng_state_all()])
        _torch_save(rng, tmp / "rng.pt")
        files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
        write_json_atomic(tmp / STATE_FILE, {"train_state": state.state_dict(), "run": run_record, "files": files})
    return final


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as handle:  # atomic_dir fsyncs it before the rename
        torch.save(obj, handle)


def is_valid_checkpoint(path: Path) -> bool:
    record = read_json(Path(path) / STATE_FILE)
    if not record or "files" not in record or "train_state" not in record:
        return False
    for name, size in record["files"].items():
        file_path = Path(path) / name
        if not file_path.is_file() or file_path.stat().st_size != size:
            return False
    return True


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-N dir, valid or not, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := STEP_DIR.match(path.name))]
    return sorted(found)


def valid_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in step_dirs(run_dir) if is_valid_checkpoint(path)]


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest valid checkpoint; newer invalid ones are reported and skipped (never deleted)."""
    for _step, path in reversed(step_dirs(run_dir)):
        if is_valid_checkpoint(path):
            return path
        warn(f"{path} is incomplete or corrupt (killed mid-write?); falling back to the previous checkpoint")
    return None


def read_checkpoint_record(path: Path) -> dict:
    record = read_json(Path(path) / STATE_FILE)
    if record is None:
        raise BadInput(f"{path}: no readable {STATE_FILE}; not a complete cpt checkpoint")
    return record


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainState:
    """Restore model (and optimizer, or later with `load_optimizer`) in place; returns the TrainState."""
    path = Path(path)
    record = read_checkpoint_record(path)
    model.load_state_dict(read_state_dict(path / "model.safetensors"), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if optimizer is not None:
        load_optimizer(path, optimizer)
    rng = _load_plain(path / "rng.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    return TrainState.from_state_dict(record["train_state"])


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state of the checkpoint at `path` (the head phase's or the whole model's, as saved)."""
    optimizer.load_state_dict(_load_plain(Path(path) / "optimizer.pt"))


def _load_plain(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for pickled objects, RuntimeError for a damaged zip
        raise BadInput(f"{path}: refused to load ({type(error).__name__}); a cpt checkpoint holds only plain "
                       "tensors: move this step dir away to resume from the previous one") from None


def best_pointer(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / "best.json")


def write_best_pointer(run_dir: Path, step: int, metric: str, metrics: dict) -> None:
    write_json_atomic(Path(run_dir) / "best.json", {
        "step": step, "metric": metric, "value": metrics[metric], "val_mlm_loss": metrics.get("val_mlm_loss"),
        "val_mlm_acc": metrics.get("val_mlm_acc"), "checkpoint": str(step_dir(run_dir, step).name),
    })


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete valid step dirs beyond the newest `keep`, never the best one; returns what went."""
    best = best_pointer(run_dir)
    best_step = best["step"] if best else None
    valid = valid_checkpoints(run_dir)
    removed = []
    for step, path in valid[: max(0, len(valid) - keep)]:
        if step != best_step:
            shutil.rmtree(path)
            removed.append(path)
    # Temp dirs of writes killed mid-way (.step-N.tmp; step-N.tmp from cpt before atomic_dir).
    for leftover in [*checkpoints_dir(run_dir).glob(".step-*.tmp"), *checkpoints_dir(run_dir).glob("step-*.tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return removed
