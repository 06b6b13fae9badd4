"""RUN_DIR/metrics.jsonl: one JSON object per line, written by training, read by the report, the run
summary and resume. The only code that knows its format.

    append_metrics(run_dir, {"step": 10, "loss": 3.2})
    read_metrics(run_dir)                  # lines in order; a line cut short by a kill is skipped
    merged_by_step(read_metrics(run_dir))  # one dict per step (a line after an interrupt adds to its step)
    truncate_metrics(run_dir, last_step)   # on resume: drop what a killed run logged after its checkpoint
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cpt.common.files import write_bytes_atomic

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one line and flush it to disk, so a killed run keeps every logged step."""
    with open(metrics_path(run_dir), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every whole line with a step, in file order; [] when there is no metrics file."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def merged_by_step(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per step, sorted; later lines of a step add to (and override) earlier ones."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in entries:
        by_step.setdefault(entry["step"], {}).update(entry)
    return [by_step[step] for step in sorted(by_step)]


def evaluated(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines that carry validation metrics."""
    return [entry for entry in entries if "val_mlm_loss" in entry]


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only lines up to `last_step` (the checkpoint a run resumes from); -1 keeps none."""
    path = metrics_path(run_dir)
    if not path.exists():
        return
    kept = [json.dumps(entry, ensure_ascii=False) for entry in read_metrics(run_dir) if entry["step"] <= last_step]
    write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())
