"""Writing outputs so that nothing half-written is ever seen: one staging rule for files and folders.

    write_atomic(path, data)         data ─► PATH.<random>.tmp (same folder) ─► fsync ─► rename to PATH
    with staged_dir(final) as tmp:   writes go to a hidden sibling `.NAME.partial-XXXX`; on success the
        ...                          folder is swapped into place (`replace_dir`), on any exception it is
                                     deleted, and `final` (if it existed) is left untouched.

`replace_dir` swaps a complete folder in: the old one is renamed aside first and restored if the final
rename fails, so `final` is always either the old or the new folder, never a mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARKER = ".partial-"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: Path, final: Path) -> None:
    """Move folder `new` to `final`; an existing `final` is swapped out whole (restored on failure)."""
    new, final = Path(new), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{new.name.rsplit('-', 1)[-1]}")
        final.rename(old)
    try:
        new.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A hidden temporary sibling of `final` to write into; swapped into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL_MARKER}", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
