"""Atomic file writes, fingerprints and stage manifests: how stages know what is done.

A stage writes its outputs to temp names, renames them into place, and writes its
`manifest.json` last. A stage is complete when its manifest exists and records the same
inputs and settings as the current request; otherwise it is (re)done.

Every write of cpt goes through one of these (the only places that rename a temp into place):

    with atomic_path(path) as tmp: save_file(state, tmp)        # a file a library writes by name
    with atomic_file(path, "w") as handle: handle.write(text)    # a file written through a handle
    write_bytes_atomic(path, data); write_json_atomic(path, record)
    with atomic_dir(target, replace=True) as tmp: ...            # a directory, filled then renamed
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cpt.errors import BadInput

RUN_MARKER = ".cpt-run.json"


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling a write goes through: DIR/.NAME.tmp (or .NAME.old for what it replaces)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut (its entries to disk). Filesystems that cannot fsync
    a directory (some network and FUSE mounts answer EINVAL or ENOSYS) keep the rename atomic, just not durable."""
    try:
        fsync_path(directory)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.EACCES):
            raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; once the block has written it, it is fsynced, renamed to `path`, and
    the rename is made durable (fsync of the dir). On an error the temp file is removed and `path` is
    untouched."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` that shows `path` only complete: written to a temp name, fsynced, renamed."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
        yield handle
        handle.flush()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(path: Path, record: Any) -> None:
    write_bytes_atomic(path, (json.dumps(record, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yields an empty temp dir beside `target`; once the block has filled it, it becomes `target`.

    An existing `target` is replaced only with `replace=True`: it is renamed to .NAME.old first and
    removed after the swap, and a swap killed half-way is undone on the next call (the .old one is put
    back). Without `replace`, an empty `target` dir is taken over and anything else there raises
    FileExistsError, before the block runs (and again at the swap, should one appear meanwhile).
    On an error the temp dir is removed and `target` is as it was."""
    target = Path(target)
    tmp, old = temp_name(target), temp_name(target, "old")
    if os.path.lexists(old) and not os.path.lexists(target):  # killed between the two renames last time
        old.rename(target)
    _remove(old)
    _remove(tmp)
    if not replace:
        _refuse_occupied(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if not item.is_symlink():
                fsync_path(item)
        fsync_path(tmp)
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            target.rmdir()
        if os.path.lexists(target):
            if not replace:
                _refuse_occupied(target)
            target.rename(old)
        try:
            tmp.rename(target)
        except Exception:  # e.g. EXDEV, EACCES: put the previous one back rather than leave no target
            if os.path.lexists(old) and not os.path.lexists(target):
                old.rename(target)
            raise
        fsync_dir(target.parent)
        _remove(old)
    finally:
        _remove(tmp)


def _refuse_occupied(target: Path) -> None:
    if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not an empty dir", str(target))


def _remove(path: Path) -> None:
    """Remove a file, link or dir tree at `path`, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


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
