"""Records of export files already hashed, so that a start-up hashes only the files that changed.

Hashing costs about 0.8 s per GiB of a rank's files (0.41 s measured for the 512 MiB benchmark model; at
that rate ~13 s for an 8B fp16 one), on every `run`, `compare` and `eval`. After a file's sha256 matched
the manifest, `manifest.verify_files` records the file's identity as `os.stat` gives it (`Stamp`: size,
mtime, ctime, inode, device) under its resolved path and that sha256; a later start that finds the same
path, sha256 and stamp does not read the file again.

Trust model: a change made through the file system is always seen. Any write, truncation, rename onto
the path or `os.utime` sets the file's ctime to the current time, and no user can set it back (only
changing the system clock or editing the raw device can), so a modified file no longer matches its
record and is hashed again. A file whose ctime is less than `SETTLE_NS` old when it is looked at is not
recorded: a write later in the same timestamp tick would leave its ctime unchanged. Not seen: corruption
below the file system (media errors, writes to the raw device), and whoever can write the records (the
user's own cache folder). `--rehash` hashes every file again (and records the results).

Records live outside the export directory (exports may be read-only or shared): one small JSON file per
export directory, named by a hash of its resolved path, in `$LLAMA_EXPORT_CACHE_DIR/verified/`, by
default `${XDG_CACHE_HOME:-~/.cache}/llama_export/verified/`. Ranks of one run write the same file, so
writes re-read and merge under a lock. A record file that cannot be read, parsed or written never fails
a run: it only means hashing (logged at debug level).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout

from llama_export.errors import ArtifactError
from llama_export.files import write_atomic
from llama_export.parsing import parse_json

log = logging.getLogger(__name__)

CACHE_ENV = "LLAMA_EXPORT_CACHE_DIR"
FORMAT = "llama_export.verified"
# Coarser than any file system's timestamp tick (ext4/xfs: the kernel's coarse clock, a few ms; FAT: 2 s).
SETTLE_NS = 2_000_000_000
_LOCK_WAIT_S = 2.0  # another rank of the same run writes for milliseconds; give up (no records) after this


def cache_dir() -> Path:
    """The tool's cache folder: `$LLAMA_EXPORT_CACHE_DIR`, else `${XDG_CACHE_HOME:-~/.cache}/llama_export`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama_export"


@dataclass(frozen=True)
class Stamp:
    """What `os.stat` says about a file's identity and last change (nanoseconds)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class _Record:
    sha256: str
    stamp: Stamp


@dataclass(frozen=True)
class _RecordFile:
    format: Literal["llama_export.verified"]
    version: Literal[1]
    root: str  # the export directory, resolved
    files: dict[str, _Record]  # resolved path -> what it hashed to, and its stamp then


class VerifiedFiles:
    """The records of one export directory: read once, looked up per file, new ones saved together."""

    def __init__(self, root: Path) -> None:
        self._root = str(Path(root).resolve())
        name = hashlib.sha256(self._root.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        try:
            self._path: Path | None = cache_dir() / "verified" / f"{name}.json"
        except RuntimeError as e:  # no home folder to find ~/.cache in
            log.debug("no verified-file records (%s); hashing", e)
            self._path = None
        self._records = self._read()
        self._new: dict[str, _Record | None] = {}  # None: drop the record

    def known(self, path: Path, sha256: str, stamp: Stamp) -> bool:
        """`path` (resolved) hashed to `sha256` when it last had exactly this `stamp`."""
        return self._records.get(str(path)) == _Record(sha256, stamp)

    def add(self, path: Path, sha256: str, stamp: Stamp, *, seen_ns: int) -> None:
        """Record that `path` hashed to `sha256` while it had `stamp` (taken no earlier than `seen_ns`,
        `time.time_ns()`); a file changed less than `SETTLE_NS` before that is left unrecorded."""
        if seen_ns - stamp.ctime_ns < SETTLE_NS:
            log.debug("not recording %s: changed %.3f s before it was hashed", path, (seen_ns - stamp.ctime_ns) / 1e9)
            return
        self._new[str(path)] = _Record(sha256, stamp)

    def forget(self, path: Path) -> None:
        """Drop `path`'s record: it did not hash to what the manifest says (a record that vouched for it
        was wrong, e.g. the disk changed it below the file system, and `--rehash` found it)."""
        self._new[str(path)] = None

    def save(self) -> None:
        """Merge the new records into the record file (never raises: a failure only costs hashing)."""
        if self._path is None or not any(self._new[p] != self._records.get(p) for p in self._new):
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._lock():
                merged = {**self._read(), **self._new}
                records = {p: r for p, r in merged.items() if r is not None}
                data = _RecordFile(FORMAT, 1, self._root, records)
                write_atomic(self._path, json.dumps(dataclasses.asdict(data)))
            self._records, self._new = records, {}
        except (OSError, Timeout) as e:
            log.debug("cannot write verified-file records %s (%s); the next start hashes again", self._path, e)

    def _read(self) -> dict[str, _Record]:
        if self._path is None:
            return {}
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.debug("cannot read verified-file records %s (%s); hashing", self._path, e)
            return {}
        try:
            data = parse_json(raw, _RecordFile, source=str(self._path), fix="it is rewritten", error=ArtifactError)
        except ArtifactError as e:
            log.debug("ignoring verified-file records: %s", e)
            return {}
        if data.root != self._root:  # a name collision: another export's records
            return {}
        return dict(data.files)

    def _lock(self) -> FileLock:
        """An exclusive lock on a file beside the record file (kept: removing it would race), waited for
        at most _LOCK_WAIT_S (then `save` gives up: no records, only hashing next time)."""
        assert self._path is not None
        return FileLock(self._path.with_name(f".{self._path.name}.lock"), timeout=_LOCK_WAIT_S, mode=0o600)
