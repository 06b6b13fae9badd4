"""What a checkpoint records of its run, which checkpoint a run resumes from, and whether it may.

Every checkpoint's state.json holds, under "run", the full resolved TrainConfig ("config"), the cpt
version that wrote it, the fingerprints of the data it was trained on and the metrics of its
evaluation. A run resumes only a checkpoint trained on the same data with the same settings of
RESUME_SETTINGS; checkpoints written before the full config was recorded name those settings at
the top of their record (and leave out those at their defaults), and still resume.

    record = run_record(config, shards_manifest)         # Session.record
    path = resume_path(config, run_dir)                   # --resume auto|never|PATH -> a step dir or None
    check_compatible(path, record)                        # BadInput naming what changed
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from cpt import __version__
from cpt.common.runtime import info
from cpt.config import TrainConfig, json_values
from cpt.errors import BadInput
from cpt.training import checkpoint as ckpt

# The settings that shape the optimizer trajectory or the data a step sees: a resumed run must repeat them.
RESUME_SETTINGS = ("global_batch_size", "masking", "mask_prob", "seed", "head_warmup", "head_warmup_lr",
                   "replay_share")
DATA_KEYS = ("shards", "tokenizer_sha256", "replay_shards")  # fingerprints of what was trained on


def run_record(config: TrainConfig, shards_manifest: dict, replay_manifest: dict | None = None) -> dict:
    """The "run" part of every checkpoint's state.json: the full config, the tool version and the data's
    fingerprints (with --replay-share, the share and the replay shards; absent without)."""
    replay = {}
    if config.replay_share:
        replay = {"replay_share": config.replay_share,
                  "replay_shards": {split: replay_manifest["splits"][split]["fingerprint"] for split in ("train", "val")}}
    return {
        **replay,
        "config": json_values(config),
        "cpt_version": __version__,
        "shards": {split: shards_manifest["splits"][split]["fingerprint"] for split in ("train", "val")},
        "tokenizer_sha256": shards_manifest["tokenizer_sha256"],
    }


def resume_settings(record: dict) -> dict[str, Any]:
    """RESUME_SETTINGS as the checkpoint with run record `record` was trained: from its full config, or (older
    checkpoints) from the few settings it recorded, a missing one having been at its default."""
    if "config" in record:
        return {name: record["config"].get(name) for name in RESUME_SETTINGS}
    defaults = {field.name: field.default for field in fields(TrainConfig)}
    return {name: record.get(name, defaults[name]) for name in RESUME_SETTINGS}


def check_compatible(checkpoint_path: Path, expected: dict) -> None:
    """BadInput when the checkpoint was trained on other data or with other RESUME_SETTINGS than `expected`
    (this run's run_record)."""
    found = ckpt.read_checkpoint_record(checkpoint_path).get("run", {})
    want, got = resume_settings(expected), resume_settings(found)
    changed = [name for name in DATA_KEYS if found.get(name) != expected.get(name)]
    changed += [name for name in RESUME_SETTINGS if got[name] != want[name]]
    if changed:
        raise BadInput(
            f"{checkpoint_path} was trained with other {', '.join(changed)}; resume with the same settings, "
            "or use a new --output (or --resume never in a new dir)"
        )


def resume_path(config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint --resume names: auto = the newest valid one (None when there is none), never = None
    (refused when checkpoints exist), else the given step dir."""
    if config.resume == "auto":
        found = ckpt.step_dirs(run_dir)
        if not found:
            return None
        latest = ckpt.latest_valid_checkpoint(run_dir)
        if latest is None:
            raise BadInput(
                f"{ckpt.checkpoints_dir(run_dir)} holds {len(found)} step dir(s) but no valid checkpoint "
                "(each lacks state.json or a complete file); move them away to start from the base model, "
                "or pass --resume PATH"
            )
        return latest
    if config.resume == "never":
        if ckpt.step_dirs(run_dir):
            raise BadInput(f"--resume never, but {ckpt.checkpoints_dir(run_dir)} holds checkpoints; "
                           "use a new --output or --resume auto")
        return None
    path = Path(config.resume)
    if not path.is_absolute() and not path.exists():
        path = ckpt.checkpoints_dir(run_dir) / config.resume
    if not ckpt.is_valid_checkpoint(path):
        raise BadInput(f"--resume {config.resume}: not a valid checkpoint dir; use auto, never or a step-N dir")
    return path


def is_better(metric: str, metrics: dict, best: dict | None) -> bool:
    """Is this evaluation better than the best so far? Ties in accuracy go to the lower loss."""
    value = metrics.get(metric, math.nan)
    if math.isnan(value):
        return False
    if best is None:
        return True
    if metric == "val_mlm_loss":
        return value < best["value"]
    return (value, -metrics.get("val_mlm_loss", math.inf)) > (best["value"], -best.get("val_mlm_loss", math.inf))


def repair_best_pointer(run_dir: Path, checkpoint_path: Path, step: int, metric: str) -> None:
    """A kill between renaming step-N/ into place and updating best.json leaves N unconsidered: redo that."""
    metrics = ckpt.read_checkpoint_record(checkpoint_path).get("run", {}).get("metrics", {})
    if metric in metrics and is_better(metric, metrics, ckpt.best_pointer(run_dir)):
        ckpt.write_best_pointer(run_dir, step, metric, metrics)


def save_and_point(run_dir: Path, model, optimizer, state: ckpt.TrainState, record: dict, config: TrainConfig,
                   metrics: dict) -> Path:
    """Write step-N/ with this evaluation's metrics, move best.json to it when it is better, prune the
    old checkpoints. Main process only."""
    path = ckpt.save_checkpoint(run_dir, model, optimizer, state, {**record, "metrics": metrics})
    if is_better(config.best_metric, metrics, ckpt.best_pointer(run_dir)):
        ckpt.write_best_pointer(run_dir, state.step, config.best_metric, metrics)
    ckpt.prune_checkpoints(run_dir, config.keep_checkpoints)
    info(f"checkpoint: {path}")
    return path
