"""Console output (rich, main process only) and the metrics log RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    if is_main_process():
        console.print(message)


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"[yellow]warning:[/yellow] {message}")


def console_error(message: str) -> None:
    # Plain print: the one line must survive any terminal and be easy to grep in k8s logs.
    print(f"cpt: error: {message}", file=sys.stderr, flush=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so a killed run keeps every logged step."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
