"""Errors cpt reports to users, and the exit-code table shared with entrypoint.sh and k8s/.

A stage raises `BadInput` (or another `CptError`) with one line that names the file or variable
and the fix; `cli.py` prints that line and exits with the error's code. Anything else is a crash
(exit 1) and prints a traceback only when CPT_DEBUG=1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERRUPTED = 4

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_CRASH: "unexpected failure (a bug or the machine): retrying may help",
    EXIT_USAGE: "usage error: a flag or env var is malformed; fix the command",
    EXIT_BAD_INPUT: "bad input (corpus, base model, output dir, settings): do not retry, fix the input",
    EXIT_INTERRUPTED: "interrupted after a checkpoint (SIGTERM/SIGINT): rerun the same command to resume",
}


class CptError(Exception):
    """An error with a one-line message for the user and an exit code."""

    exit_code = EXIT_CRASH

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(CptError):
    """The user's corpus, model, output dir or settings cannot be used; retrying will not help."""

    exit_code = EXIT_BAD_INPUT


class UsageError(CptError):
    """A malformed flag or environment variable."""

    exit_code = EXIT_USAGE


class Interrupted(CptError):
    """Training stopped on a signal after writing a checkpoint; a rerun resumes."""

    exit_code = EXIT_INTERRUPTED


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (its type name when empty), for a one-line BadInput."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
