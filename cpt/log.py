"""Console output (rich, main process only) and the metrics log RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)  # no wrapping of paths in k8s logs


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


class StepProgress:
    """Training progress: a rich bar with ETA on a terminal (main process), plain lines otherwise (k8s logs)."""

    def __init__(self, total_steps: int, start_step: int):
        self.total_steps, self.start_step = total_steps, start_step
        self._progress = None
        self._task = None

    def __enter__(self) -> StepProgress:
        if is_main_process() and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                      TextColumn("{task.fields[status]}"), console=console)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total_steps, completed=self.start_step, status="")
        return self

    def advance(self, step: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **({"status": status} if status else {}))

    def line(self, text: str) -> None:
        info(text)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    if not is_main_process():
        return
    from rich.table import Table

    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
