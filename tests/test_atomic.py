"""moeprune/atomic.py: a failed write leaves the previous file/folder as it was and no temp behind."""

from __future__ import annotations

import os

import pytest

from moeprune.atomic import atomic_dir, atomic_write, atomic_write_text


def test_atomic_write_replaces_or_keeps(tmp_path):
    path = tmp_path / "f.json"
    assert atomic_write_text(path, "one") == str(path) and path.read_text() == "one"
    atomic_write_text(path, "two")
    assert path.read_text() == "two"

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["f.json"]


def test_atomic_dir_swaps_in_or_keeps(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()  # built next to the target, invisible until done
        (tmp / "a.txt").write_text("new")
    assert os.listdir(out) == ["a.txt"]
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("partial")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["a.txt"]
    with atomic_dir(out) as tmp:  # replacing: the old folder is gone afterwards, nothing left aside
        (tmp / "c.txt").write_text("newer")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["c.txt"]
