"""Where this process runs and what it prints: the only reader of torchrun's RANK / WORLD_SIZE /
LOCAL_RANK, console output (rich, main process only), and how a distributed worker exits.

    if is_main_process(): ...        # rank 0 writes files
    world_size(), rank(), local_rank()
    leave_process(code)              # a finished worker under torchrun or mp.spawn
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)  # no wrapping of paths in k8s logs


def rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the job under torchrun (1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (picks its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def leave_process(code: int) -> None:
    """End a distributed worker now: flush output, then os._exit, skipping interpreter shutdown. At shutdown
    a C++ thread of torch.distributed (gloo) was seen to abort a worker whose work was done and whose
    process group was destroyed ("terminate called without an active exception", SIGABRT, exit 134): in
    cpt under torchrun (a clean stop turned into a crash the cluster retries) and in a test's spawned
    gloo worker (stop 22's CI). Files are written atomically before this is reached."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe must not turn this into a normal exit
            pass
    os._exit(code)


def info(message: str) -> None:
    if is_main_process():
        console.print(message)


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"[yellow]warning:[/yellow] {message}")


def console_error(message: str) -> None:
    # Plain print: the one line must survive any terminal and be easy to grep in k8s logs.
    print(f"cpt: error: {message}", file=sys.stderr, flush=True)


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
