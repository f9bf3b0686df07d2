"""Faults with real processes: signals during an export, a killed export's leftovers.

(Dying and stopped ranks: tests/test_rank_failure.py; a full or read-only file system and the other
user errors: tests/test_error_table.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_export.artifact.manifest import load_manifest, sha256_file
from llama_export.files import PARTIAL_MARKER
from tests.helpers import REPO, tiny_export


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("faults"), seed=6, tp=2)


def _files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PARTIAL_MARKER in p.name)


def _export_until_staging(ckpt: Path, out: Path) -> subprocess.Popen:
    """Start `llama-export export` and return once its staging folder exists (the export is working)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_export.cli", "export", "--checkpoint", str(ckpt), "--out", str(out),
         "--tp", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    folder = out / ckpt.name
    before = set(_partials(folder))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if set(_partials(folder)) - before:
            time.sleep(0.5)  # into tracing
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the export never staged: {proc.communicate()}")


@pytest.mark.slow
def test_signals_during_an_export_leave_nothing_and_lose_nothing(earlier):
    """SIGKILL leaves a staging folder (nothing can run on SIGKILL); the next export sweeps it. SIGTERM
    and SIGINT end an export with one line, remove its staging folder, and the earlier export stays
    byte-identical throughout."""
    ckpt, path = earlier
    before = _files(path)

    killed = _export_until_staging(ckpt, path.parents[1])
    killed.kill()
    killed.communicate()
    assert len(_partials(path.parent)) == 1  # what a SIGKILL leaves behind
    assert _files(path) == before

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = _export_until_staging(ckpt, path.parents[1])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == code, err
        assert lines == [f"interrupted ({sig.name})"], err
        assert _partials(path.parent) == []  # its own staging folder, and the killed one's (swept at start)
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no lock file either
        assert _files(path) == before
    load_manifest(path)
