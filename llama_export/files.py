"""Writing outputs so that nothing half-written is ever seen and nothing earlier is lost.

    write_atomic(path, data)          data ─► .NAME.<owner>.<random>.tmp (same folder) ─► fsync ─► rename
    with staging(final) as stage:     writes go to stage.path, a hidden sibling `.NAME.partial-<owner>-…`;
        ...                           on success it is swapped into stage.target (`final`, unless the
                                      caller diverted it, e.g. to a `.failed` name), on any exception or
                                      signal-raised interrupt it is deleted, and `final` is left untouched.
    staged_dir(final)                 the same, yielding the path only.

Folders and files are created with the modes the process's umask gives (0777 / 0666 & ~umask), as
`mkdir` and `open` would, not the private 0700 / 0600 of `mkdtemp` / `mkstemp`: an export may be shared.

`<owner>` is the writing process's pid and start time. A staging folder or temporary file whose owner is
no longer running (the process was killed with SIGKILL, or the machine went down) is stale: the next
`staging`/`write_atomic` in that folder removes it. Only names in these formats are ever removed, and
never one whose owner is alive.

One writer per target: `staging(final)` holds an exclusive lock (`.NAME.lock`, filelock) for its whole
duration, so a second export to the same target fails at once, naming the first one's pid, instead of
racing it in the swap. `replace_dir` swaps a complete folder in: the old one is renamed aside first and
restored if the final rename fails, so `final` is always either the old or the new folder, never a mix;
a swap cut short by SIGKILL between its two renames is undone by the next `staging(final)`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llama_export.clock import process_start
from llama_export.errors import OutputError

log = logging.getLogger(__name__)

PARTIAL_MARKER = ".partial-"
OLD_MARKER = ".old-"
# .NAME.partial-<pid>-<start>-<random>  /  .NAME.old-<pid>-<start>-<random>  /  .NAME.<pid>-<start>.<random>.tmp
_OWNED = re.compile(r"^\.(?P<name>.+?)(?:\.(?:partial|old)-|\.)(?P<pid>\d+)-(?P<start>\d+)(?:-\w+|\.\w+\.tmp)$")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in 1/100 s (`clock.process_start`), None if it is not running."""
    start = process_start(pid)
    return None if start is None else round(start * 100)


_OWNER = ""


def _owner() -> str:
    """`pid-start` of this process (computed on first use, and again after a fork)."""
    global _OWNER
    if not _OWNER.startswith(f"{os.getpid()}-"):
        _OWNER = f"{os.getpid()}-{_start_ticks(os.getpid())}"
    return _OWNER


def _is_stale(entry: Path) -> bool:
    m = _OWNED.match(entry.name)
    if m is None:
        return False
    pid, start = int(m["pid"]), int(m["start"])
    return _start_ticks(pid) != start  # not running, or the pid now belongs to another process


def sweep_stale(folder: Path) -> list[Path]:
    """Remove staging folders and temporary files in `folder` whose owner process is gone; returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and OLD_MARKER not in entry.name and _is_stale(entry):
            log.info("removing %s, left behind by a process that no longer runs", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    """This process's umask (Linux: read from /proc, which leaves it untouched for other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    sweep_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    try:
        with _naming(path), os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # not mkstemp's 0600: as `open` would create it
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: object, *, indent: int | None = None) -> None:
    """`write_atomic` of `payload` as strict JSON: a NaN or Infinity in it is a ValueError, never written
    (they are not JSON; a writer maps them to null or refuses earlier, with a message)."""
    write_atomic(path, json.dumps(payload, indent=indent, allow_nan=False))


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError without a file name (a failed write: ENOSPC, EFBIG) gets `path` as its file name."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def replace_dir(new: Path, final: Path) -> None:
    """Move folder `new` to `final`; an existing `final` is swapped out whole (restored on failure)."""
    new, final = Path(new), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{OLD_MARKER}{_owner()}-{secrets.token_hex(4)}")
        final.rename(old)
    try:
        new.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class Stage:
    """A staging folder (`path`) and where it goes on success (`target`)."""

    path: Path
    target: Path

    def divert(self, target: Path) -> None:
        """Swap the finished folder into `target` instead (a sibling of the original target)."""
        self.target = Path(target)


# How long a second writer waits for a target's lock before it is refused: not to wait for another export
# (that takes minutes), only to ride over a lock file just removed by a writer that finished (filelock then
# finds its descriptor on the removed file and opens the new one).
_LOCK_WAIT_S = 0.25


def _write_pid(fd: int) -> None:
    with contextlib.suppress(OSError):  # only for the message of a second writer (a full disk: no pid)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())


@contextmanager
def _target_lock(final: Path) -> Iterator[None]:
    """Exclusive lock on `final` for this process (filelock: flock on `.NAME.lock`, which holds the
    holder's pid), released and its file removed on exit."""
    from filelock import FileLock, Timeout  # lazily: ~30 ms of imports that a run writing nothing does not need

    path = final.with_name(f".{final.name}.lock")
    lock = FileLock(path, timeout=_LOCK_WAIT_S, on_acquired=_write_pid)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text(errors="replace").strip()[:32] or "?"
        except OSError:
            holder = "?"
        raise OutputError(f"{final} is being written by another llama-export process (pid {holder}); "
                          "wait for it to finish or choose another --out") from None
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still holding the lock, so no one else holds this file
        finally:
            lock.release()


def _recover_interrupted_swap(final: Path) -> None:
    """`final` missing but an `.old-` copy of it left by a dead process: the swap was cut between its
    two renames; put the old folder back. Other stale `.old-` copies are removed."""
    olds = sorted((p for p in final.parent.glob(f".{final.name}{OLD_MARKER}*") if _is_stale(p)),
                  key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        log.warning("restoring %s from %s (an earlier swap was interrupted)", final, olds[-1].name)
        olds.pop().rename(final)
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def staging(final: Path) -> Iterator[Stage]:
    """A hidden temporary sibling of `final` to write into; swapped into `stage.target` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _target_lock(final):
        _recover_interrupted_swap(final)
        sweep_stale(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_MARKER}{_owner()}-", dir=final.parent))
        stage = Stage(tmp, final)
        try:
            tmp.chmod(0o777 & ~_umask())  # not mkdtemp's 0700: as `mkdir` would create it
            with _naming(final):
                yield stage
            replace_dir(tmp, stage.target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """`staging(final)`, yielding only the folder to write into."""
    with staging(final) as stage:
        yield stage.path


# ---- destinations, checked before any work starts --------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_folder(path: Path, label: str) -> None:
    """`path` is, or can be created as, a folder this process can write in (probed with a file)."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{label}: {base} is a file, not a folder; choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{_owner()}.probe.", suffix=".tmp", dir=base)
    except OSError as e:
        why = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full"}.get(e.errno, e.strerror)
        raise OutputError(f"{label}: cannot write in {base} ({why}); choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def _not_an_input(path: Path, label: str, inputs: Iterable[Path | None]) -> None:
    """`path` is none of the files in `inputs` and lies inside none of its folders (the command reads
    them: writing there would overwrite what it reads, or change an export under its manifest)."""
    out = Path(os.path.realpath(path))
    for given in inputs:
        if given is None:
            continue
        src = Path(os.path.realpath(given))
        if src.is_dir():
            if out.is_relative_to(src):
                raise OutputError(f"{label} lies inside {given}, which this command reads; write it elsewhere")
        elif out == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise OutputError(f"{label} would overwrite {given}, which this command reads; write it elsewhere")


def check_output_dir(path: Path, *, what: str, shown: Path | None = None, inputs: Iterable[Path | None] = ()) -> None:
    """`path` is, or can be created as, a writable folder outside every one of `inputs` (files and
    folders the command reads); `what` names the option and `shown` its value (default: `path`) for
    the message."""
    label = f"{what} {shown if shown is not None else path}"
    _not_an_input(Path(path), label, inputs)
    _writable_folder(Path(path), label)


def check_output_file(path: Path, *, what: str, inputs: Iterable[Path | None] = ()) -> None:
    """`path` can be written as a file: not a folder, in a folder that exists or can be made, writable,
    and neither one of `inputs` (files and folders the command reads) nor inside one of them."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    _not_an_input(path, f"{what} {path}", inputs)
    _writable_folder(path.parent, f"{what} {path}")
