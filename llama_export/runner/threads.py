"""How many CPU threads a rank computes with: asked for, decided by the launcher, or the cores other
processes are not keeping busy, shared by the ranks."""

from __future__ import annotations

import os
import time

import psutil

from llama_export.runner.env import THREADS, started_by_launcher


def _cpu_sample() -> tuple[float, list, float]:
    """(monotonic time, the machine's per-core CPU times, this process's CPU time)."""
    return time.monotonic(), psutil.cpu_times(percpu=True), time.process_time()


_STARTED = _cpu_sample()  # the window `rank_threads` looks at opens when this module is imported
_MIN_WINDOW_S = 0.1
_MAX_WINDOW_S = 2.0  # later than this (a long-lived process), the load is measured afresh


def _busy(t) -> float:
    """Seconds a core spent working (psutil's own definition: not idle, not waiting for I/O)."""
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def allowed_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity; elsewhere than Linux, all of them)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def rank_threads(requested: int | None, world_size: int) -> int:
    """CPU threads for one rank: `requested`; in a rank started by `launch_local`, what the launcher
    decided; otherwise the cores this process may run on that other processes are not keeping busy,
    shared evenly by the ranks, at least 1.

    The load is measured since this module was imported (at least 0.1 s: it waits for the rest), with
    this process's own CPU time (its start-up) taken out, so that a start on an idle machine waits for
    nothing; more than 2 s after the import, over a fresh 0.1 s.

    Set explicitly in every rank, so that no library picks its own default: a thread pool as large as
    the machine stalls on every parallel region while another process holds one of its cores
    (measured: `benchmarks/bench_busy_threads.py`)."""
    if requested is not None:
        return requested
    decided = os.environ.get(THREADS) if started_by_launcher() else None
    if decided is not None and decided.isdigit() and int(decided) >= 1:
        return int(decided)
    cores = allowed_cores()
    start, before, own_before = _STARTED
    if time.monotonic() - start > _MAX_WINDOW_S:
        start, before, own_before = _cpu_sample()
    time.sleep(max(0.0, _MIN_WINDOW_S - (time.monotonic() - start)))
    end, after, own_after = _cpu_sample()
    busy = sum(_busy(after[c]) - _busy(before[c]) for c in cores if c < min(len(before), len(after)))
    others = max(0.0, busy - (own_after - own_before)) / (end - start)  # cores' worth kept busy by others
    free = len(cores) - round(others)
    return max(1, max(1, free) // world_size)


def set_process_threads(requested: int | None) -> int:
    """Decide and apply this process's CPU thread count (one process running every rank: `export`'s
    validation, `compare`); returns it."""
    import torch

    threads = rank_threads(requested, 1)
    torch.set_num_threads(threads)
    return threads
