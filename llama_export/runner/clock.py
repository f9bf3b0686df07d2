"""How long the command has run: from this process's start, or from the launcher's for a rank it
started (Linux /proc, 10 ms resolution)."""

from __future__ import annotations

import os
from pathlib import Path

from llama_export.runner.env import STARTED_AT, started_by_launcher


def boot_clock() -> tuple[float, float] | None:
    """(now, this process's start), both in seconds after boot (/proc, 10 ms resolution); None where
    there is no /proc."""
    try:
        now = float(Path("/proc/uptime").read_text().split()[0])
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return now, int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime, in ticks
    except (OSError, ValueError, IndexError):
        return None


def seconds_since_start() -> float | None:
    """Seconds since the command started: this process, or the `launch_local` launcher that started
    this rank; None where that cannot be read (no /proc)."""
    clock = boot_clock()
    if clock is None:
        return None
    now, started = clock
    launcher = os.environ.get(STARTED_AT) if started_by_launcher() else None
    if launcher is not None:
        try:
            started = float(launcher)
        except ValueError:
            pass
    return now - started
