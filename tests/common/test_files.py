"""cpt.common.files: the one atomic write. A failure leaves the target as it was and no temp behind; a
directory swap killed between its two renames is undone by the next write."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from cpt.common import files
from cpt.common.files import atomic_dir, atomic_file, atomic_path, temp_name, write_bytes_atomic, write_json_atomic


class Boom(Exception):
    pass


def listing(directory: Path) -> dict[str, bytes | None]:
    """Every entry under `directory` (hidden ones too): file bytes, None for a dir."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def test_temp_names_are_hidden_siblings(tmp_path):
    assert temp_name(tmp_path / "model") == tmp_path / ".model.tmp"
    assert temp_name(tmp_path / "model", "old") == tmp_path / ".model.old"


@pytest.mark.parametrize("existing", [None, b"before"])
def test_atomic_path_failure_keeps_the_target_and_leaves_no_temp(tmp_path, existing):
    target = tmp_path / "weights.bin"
    if existing is not None:
        target.write_bytes(existing)
    before = listing(tmp_path)
    with pytest.raises(Boom), atomic_path(target) as tmp:
        assert tmp == tmp_path / ".weights.bin.tmp"
        tmp.write_bytes(b"half")
        raise Boom
    assert listing(tmp_path) == before


def test_atomic_path_and_file_write_then_rename(tmp_path):
    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"one")
        assert not (tmp_path / "a.bin").exists(), "the target appears only once complete"
    with atomic_file(tmp_path / "b.txt", "w") as handle:
        handle.write("二\n")
    write_bytes_atomic(tmp_path / "a.bin", b"three")
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": "文"})
    assert listing(tmp_path) == {"a.bin": b"three", "b.txt": "二\n".encode(),
                                 "c.json": (json.dumps({"a": "文", "b": 1}, ensure_ascii=False, indent=2) + "\n").encode()}


def test_atomic_file_failure_keeps_the_target(tmp_path):
    (tmp_path / "train.txt").write_text("old\n", encoding="utf-8")
    with pytest.raises(Boom), atomic_file(tmp_path / "train.txt", "w") as handle:
        handle.write("new, half")
        raise Boom
    assert listing(tmp_path) == {"train.txt": b"old\n"}


def fill(directory: Path, text: str) -> None:
    (directory / "sub").mkdir()
    (directory / "sub" / "file.txt").write_text(text, encoding="utf-8")
    (directory / "top.txt").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("replace", [False, True])
def test_atomic_dir_creates_a_new_dir(tmp_path, replace):
    with atomic_dir(tmp_path / "out" / "model", replace=replace) as tmp:
        assert tmp == tmp_path / "out" / ".model.tmp" and tmp.is_dir() and not any(tmp.iterdir())
        fill(tmp, "new")
    assert listing(tmp_path / "out") == {"model": None, "model/sub": None, "model/sub/file.txt": b"new",
                                         "model/top.txt": b"new"}


def test_atomic_dir_failure_keeps_the_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    fill(target, "old")
    before = listing(tmp_path)
    with pytest.raises(Boom), atomic_dir(target, replace=True) as tmp:
        fill(tmp, "new")
        raise Boom
    assert listing(tmp_path) == before


def test_atomic_dir_replace_swaps_and_leaves_nothing_aside(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    fill(target, "old")
    (target / "only-in-old.txt").write_text("x", encoding="utf-8")
    with atomic_dir(target, replace=True) as tmp:
        fill(tmp, "new")
        assert (target / "top.txt").read_text(encoding="utf-8") == "old", "the old dir stays until the swap"
    assert listing(tmp_path) == {"model": None, "model/sub": None, "model/sub/file.txt": b"new",
                                 "model/top.txt": b"new"}


def test_atomic_dir_replace_takes_the_place_of_a_file(tmp_path):
    (tmp_path / "model").write_bytes(b"a file")
    with atomic_dir(tmp_path / "model", replace=True) as tmp:
        fill(tmp, "new")
    assert listing(tmp_path)["model/top.txt"] == b"new" and set(listing(tmp_path)) == {
        "model", "model/sub", "model/sub/file.txt", "model/top.txt"}


def test_a_swap_killed_between_the_renames_is_undone_on_the_next_call(tmp_path):
    target, old = tmp_path / "model", tmp_path / ".model.old"
    old.mkdir()  # the state a kill after `model -> .model.old`, before `.model.tmp -> model` leaves
    fill(old, "previous")
    (tmp_path / ".model.tmp").mkdir()  # and the new dir that never made it
    (tmp_path / ".model.tmp" / "half.bin").write_bytes(b"half")

    with pytest.raises(Boom), atomic_dir(target, replace=True):
        assert listing(target) == {"sub": None, "sub/file.txt": b"previous", "top.txt": b"previous"}, \
            "the previous dir is back before the block runs"
        raise Boom
    assert listing(tmp_path) == {"model": None, "model/sub": None, "model/sub/file.txt": b"previous",
                                 "model/top.txt": b"previous"}


def test_a_swap_killed_after_the_renames_drops_the_old_dir(tmp_path):
    (tmp_path / ".model.old").mkdir()
    fill(tmp_path / ".model.old", "previous")
    (tmp_path / "model").mkdir()
    fill(tmp_path / "model", "current")
    with atomic_dir(tmp_path / "model", replace=True) as tmp:
        fill(tmp, "new")
    assert set(listing(tmp_path)) == {"model", "model/sub", "model/sub/file.txt", "model/top.txt"}


def test_atomic_dir_takes_over_an_empty_dir(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        fill(tmp, "new")
    assert listing(tmp_path / "out") == {"sub": None, "sub/file.txt": b"new", "top.txt": b"new"}


@pytest.mark.parametrize("occupant", ["non-empty dir", "file"])
def test_atomic_dir_without_replace_refuses_an_occupied_target_before_the_block(tmp_path, occupant):
    target = tmp_path / "out"
    if occupant == "file":
        target.write_bytes(b"mine")
    else:
        target.mkdir()
        (target / "keep.txt").write_bytes(b"mine")
    before = listing(tmp_path)
    ran = []
    with pytest.raises(FileExistsError, match=str(target)), atomic_dir(target):
        ran.append(1)
    assert not ran and listing(tmp_path) == before


def test_atomic_dir_without_replace_refuses_a_target_that_appears_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_dir(target) as tmp:
        fill(tmp, "new")
        target.mkdir()
        (target / "keep.txt").write_bytes(b"mine")
    assert listing(tmp_path) == {"out": None, "out/keep.txt": b"mine"}


def test_a_failed_final_rename_puts_the_previous_dir_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    fill(target, "old")
    before = listing(tmp_path)
    real_rename = Path.rename

    def rename(self, destination):
        if self.name == ".model.tmp":
            raise OSError(18, "Invalid cross-device link")
        return real_rename(self, destination)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="cross-device"), atomic_dir(target, replace=True) as tmp:
        fill(tmp, "new")
    assert listing(tmp_path) == before


def test_an_atomic_write_makes_its_rename_durable(tmp_path, monkeypatch):
    """The data is fsynced before the rename and the directory after it: without the second, a power cut
    can bring back the old file (or none) after cpt said it was written."""
    synced = []
    monkeypatch.setattr(files, "fsync_path", lambda path: synced.append(Path(path)))
    files.write_json_atomic(tmp_path / "state.json", {"step": 3})
    assert synced == [files.temp_name(tmp_path / "state.json"), tmp_path]


@pytest.mark.parametrize("code, kept", [(errno.EINVAL, True), (errno.EIO, False)])
def test_a_filesystem_that_cannot_fsync_a_dir_keeps_the_write(tmp_path, monkeypatch, code, kept):
    def fsync(path):
        if Path(path).is_dir():
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files, "fsync_path", fsync)
    if kept:
        files.write_json_atomic(tmp_path / "state.json", {"step": 3})
        assert files.read_json(tmp_path / "state.json") == {"step": 3}
    else:
        with pytest.raises(OSError):
            files.write_json_atomic(tmp_path / "state.json", {"step": 3})
