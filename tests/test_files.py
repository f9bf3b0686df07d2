"""Atomic writes and the one directory swap: a failure at any point leaves the old content whole."""

from __future__ import annotations

import os
import stat
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


def _owner_token(pid: int) -> str:
    return f"{pid}-{files._start_ticks(pid)}"


def test_stale_staging_is_swept_only_when_its_owner_is_gone(tmp_path):
    """Leftovers of a killed process (pid no longer running with that start time) are removed by the
    next staging in the folder; a live owner's folder and names in other formats stay."""
    import os

    dead = tmp_path / f".out.partial-{os.getpid()}-1-abc"  # our pid, another start time: pid reused
    (dead / "rank0").mkdir(parents=True)
    (dead / "rank0" / "x.onnx").write_bytes(b"x" * 1000)
    dead_tmp = tmp_path / f".r.json.{os.getpid()}-1.k2j4.tmp"
    dead_tmp.write_text("{")
    live = tmp_path / f".other.partial-{_owner_token(os.getpid())}-def"
    live.mkdir()
    foreign = tmp_path / ".out.partial-manual"
    foreign.mkdir()
    with files.staged_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", live.name, foreign.name]), names


def test_a_second_writer_of_the_same_target_is_refused(tmp_path):

    final = tmp_path / "out"
    with files.staged_dir(final) as tmp:
        (tmp / "a").write_text("1")
        import subprocess
        import sys

        code = ("import sys; from llama_export import files\n"
                "with files.staged_dir(sys.argv[1]) as t: pass")
        r = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True)
        assert r.returncode != 0 and "being written by another llama-export process" in r.stderr, r.stderr
    assert _tree(final) == {"a": b"1"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the lock file is gone too


def test_swap_cut_between_its_renames_is_undone(tmp_path):
    """SIGKILL after `final` was renamed aside and before the new folder took its place: the next
    staging restores the old folder before it starts."""
    final = tmp_path / "out"
    old = tmp_path / ".out.old-999999-1-abcd"  # no such process
    old.mkdir()
    (old / "a").write_text("old")
    with pytest.raises(RuntimeError), files.staged_dir(final):
        assert _tree(final) == {"a": b"old"}
        raise RuntimeError("this export fails too")
    assert _tree(final) == {"a": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_divert_puts_the_folder_elsewhere_and_keeps_final(tmp_path):
    final = tmp_path / "out"
    with files.staged_dir(final) as tmp:
        (tmp / "a").write_text("good")
    with files.staging(final) as stage:
        (stage.path / "a").write_text("bad")
        stage.divert(tmp_path / "out.failed")
    assert _tree(final) == {"a": b"good"} and _tree(tmp_path / "out.failed") == {"a": b"bad"}


@pytest.mark.parametrize("kind", ["file_as_folder", "folder_as_file"])
def test_destinations_are_checked(tmp_path, kind):
    from llama_export.errors import OutputError

    (tmp_path / "f").write_text("x")
    if kind == "file_as_folder":
        with pytest.raises(OutputError, match="is a file, not a folder"):
            files.check_output_dir(tmp_path / "f" / "sub", what="--out")
    else:
        with pytest.raises(OutputError, match="is a folder; give a file name"):
            files.check_output_file(tmp_path, what="--json")
    files.check_output_file(tmp_path / "new" / "r.json", what="--json")
    assert not (tmp_path / "new").exists()


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_staged_folders_and_atomic_files_honour_the_umask(tmp_path, umask):
    """An export may be shared: its folder gets 0777 & ~umask and a written file 0666 & ~umask, as mkdir
    and open give, not mkdtemp's 0700 / mkstemp's 0600."""
    with files.staged_dir(tmp_path / "export") as stage:
        (stage / "rank0").mkdir()
        files.write_atomic(stage / "manifest.json", "{}")
    files.write_atomic(tmp_path / "r.json", "{}")
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "export" / "rank0").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "export" / "manifest.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask


def test_an_output_is_never_one_of_the_inputs(tmp_path):
    """--json onto a file the command reads, or into a folder it reads, is refused before any work."""
    from llama_export.errors import OutputError

    export, text = tmp_path / "export", tmp_path / "held.txt"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    text.write_text("hi")
    (tmp_path / "link").symlink_to(export)
    inputs = (export, text, None)
    for out in (export / "manifest.json", export / "new.json", tmp_path / "link" / "x.json",
                export / "rank0" / "r.json"):
        with pytest.raises(OutputError, match=r"lies inside .*export, which this command reads; write it elsewhere"):
            files.check_output_file(out, what="--json", inputs=inputs)
    os.link(text, tmp_path / "hard.txt")
    for out in (text, tmp_path / "." / "held.txt", tmp_path / "hard.txt"):
        with pytest.raises(OutputError, match=r"held.txt, which this command reads"):
            files.check_output_file(out, what="--json", inputs=inputs)
    with pytest.raises(OutputError, match="lies inside"):
        files.check_output_dir(export / "pg", what="--polygraphy", inputs=inputs)
    files.check_output_file(tmp_path / "r.json", what="--json", inputs=inputs)
    files.check_output_file(tmp_path / "export.json", what="--json", inputs=inputs)  # a sibling, not inside
    assert (export / "manifest.json").read_text() == "{}" and text.read_text() == "hi"
