"""Atomic file writes, fingerprints and stage manifests: how stages know what is done.

A stage writes its outputs to temp names, renames them into place, and writes its
`manifest.json` last. A stage is complete when its manifest exists and records the same
inputs and settings as the current request; otherwise it is (re)done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cpt.errors import BadInput

RUN_MARKER = ".cpt-run.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, record: Any) -> None:
    write_bytes_atomic(path, (json.dumps(record, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (a partial write counts as missing)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """One hash over several files' contents and names (order matters)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def sha256_json(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def claim_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Create RUN_DIR or check it is a cpt run dir; never take over a folder of the user's files."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInput(f"--output {run_dir} is a file; pass a directory for the run")
    if run_dir.is_dir() and not (run_dir / RUN_MARKER).exists() and any(run_dir.iterdir()) and not overwrite:
        raise BadInput(
            f"--output {run_dir} is not empty and holds no cpt run; pick a new directory (or --overwrite to use it)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / RUN_MARKER).exists():
            write_json_atomic(run_dir / RUN_MARKER, {"tool": "cpt", "layout": 1})
    except OSError as error:
        raise BadInput(f"--output {run_dir} is not writable ({error.strerror}); pass a directory you can write") from None


def require_manifest(path: Path, what_makes_it: str) -> dict[str, Any]:
    manifest = read_json(path)
    if manifest is None:
        raise BadInput(f"{path} is missing; run `{what_makes_it}` first (or `cpt run`)")
    return manifest


TRAINED_OUTPUTS = ("checkpoints", "best.json", "metrics.jsonl", "export.json", "model", "report.md", "curves.png",
                   "tensorboard")


def guard_trained_outputs(run_dir: Path, *, overwrite: bool, what_changed: str) -> None:
    """Before a data stage redoes its outputs: checkpoints trained on the old data must not be silently
    orphaned. Refuse, or with --overwrite move them (never delete) to RUN_DIR/previous-<time>/."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir() or not any(path.name.startswith("step-") for path in checkpoints.iterdir()):
        return
    if not overwrite:
        raise BadInput(
            f"{run_dir} holds checkpoints trained on its current data, but {what_changed} changed; use a new "
            f"--output (to continue from the adapted model, pass --base-model {run_dir / 'model'}), or --overwrite "
            "to redo the data (the old checkpoints and model are moved to RUN_DIR/previous-<time>/)"
        )
    import time

    aside = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for name in TRAINED_OUTPUTS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
