"""Atomic writes and the one directory swap: a failure at any point leaves the old content whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_export import files


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_staged_dir_replaces_whole(tmp_path):
    final = tmp_path / "out"
    with files.staged_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with files.staged_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert _tree(final) == {"b": b"2"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_inside_leaves_the_old_folder_and_no_temp(tmp_path):
    final = tmp_path / "out"
    with files.staged_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), files.staged_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed half way")
    assert _tree(final) == {"a": b"1"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_final_rename_rolls_back(tmp_path, monkeypatch):
    final = tmp_path / "out"
    with files.staged_dir(final) as tmp:
        (tmp / "a").write_text("old")
    real = Path.rename

    def rename(self, target):
        if Path(target) == final and files.PARTIAL_MARKER in self.name:
            raise OSError("disk gone")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk gone"), files.staged_dir(final) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.undo()
    assert _tree(final) == {"a": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_atomic_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    files.write_atomic(path, "old")

    def fail(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        files.write_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
