"""`runner.threads.rank_threads`: the cores other processes keep busy are left out, this process's own start-up
is not counted against it, and an explicit or launcher-decided count wins."""

from __future__ import annotations

from collections import namedtuple

import pytest

from llama_export.runner import threads

Times = namedtuple("Times", "user nice system idle iowait")


def _core(busy: float, idle: float) -> Times:
    return Times(user=busy, nice=0.0, system=0.0, idle=idle, iowait=0.0)


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine whose CPU times the test sets: (monotonic, per-core times, own CPU time)."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LLAMA_EXPORT_WORKER", raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    now = {"t": 100.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: now["t"])

    def start_then(after: tuple[Times, Times], own_s: float, window_s: float = 0.5) -> None:
        before = (_core(0.0, 0.0), _core(0.0, 0.0))
        monkeypatch.setattr(threads, "_STARTED", (now["t"], list(before), 0.0))
        now["t"] += window_s
        monkeypatch.setattr(threads, "_cpu_sample", lambda: (now["t"], list(after), own_s))

    return start_then


def test_own_start_up_is_not_load(two_cores):
    # core 0 busy the whole window with our own imports, core 1 idle: both cores are free
    two_cores((_core(0.5, 0.0), _core(0.0, 0.5)), own_s=0.5)
    assert threads.rank_threads(None, 1) == 2


def test_a_core_kept_busy_by_another_process_is_left_out(two_cores):
    # core 0: our start-up; core 1: someone else's busy loop
    two_cores((_core(0.5, 0.0), _core(0.5, 0.0)), own_s=0.5)
    assert threads.rank_threads(None, 1) == 1
    two_cores((_core(0.5, 0.0), _core(0.5, 0.0)), own_s=0.5)
    assert threads.rank_threads(None, 2) == 1  # shared by the ranks, at least 1


def test_idle_machine_two_ranks(two_cores):
    two_cores((_core(0.0, 0.5), _core(0.0, 0.5)), own_s=0.0)
    assert threads.rank_threads(None, 2) == 1
    two_cores((_core(0.0, 0.5), _core(0.0, 0.5)), own_s=0.0)
    assert threads.rank_threads(None, 1) == 2


def test_explicit_and_launcher_decided_counts_win(two_cores, monkeypatch):
    two_cores((_core(0.5, 0.0), _core(0.5, 0.0)), own_s=0.0)
    assert threads.rank_threads(3, 1) == 3
    monkeypatch.setenv("LLAMA_EXPORT_WORKER", "1")
    monkeypatch.setenv("LLAMA_EXPORT_THREADS", "4")
    assert threads.rank_threads(None, 2) == 4
