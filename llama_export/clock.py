"""When a process started: one reading for the staging folders' owners (`files`) and the time to first
token (`runner.env.seconds_since_start`).

Linux: /proc, in seconds after boot (10 ms resolution; `/proc/uptime` is the matching "now"). Elsewhere
psutil's create_time, in seconds since the epoch (then `now` is `time.time()`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_start(pid: int) -> float | None:
    """Seconds at which process `pid` started, on the scale of `now()`; None if it is not running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) / _clock_ticks()  # field 22 of stat: starttime, in ticks after boot
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # /proc is there: the process is not
    except (OSError, ValueError, IndexError):
        pass
    import psutil  # lazily: ~15 ms of imports that Linux does not need

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def now() -> float:
    """The current time on the scale of `process_start`."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
