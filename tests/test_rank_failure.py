"""A rank killed or stopped mid-generation ends the whole run quickly, with one line naming that rank
(not the healthy rank that times out waiting for it), leaving no processes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import REPO, random_meta_state, tiny_config, write_meta


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    # A long context so that generation is still running when the rank is hit.
    cfg = dataclasses.replace(tiny_config("mha"), max_seq_len=8192)
    return write_meta(tmp_path_factory.mktemp("long") / "ckpt", cfg, random_meta_state(cfg, seed=9))


@pytest.mark.slow
@pytest.mark.parametrize("victim_signal,victim,expected", [
    (signal.SIGKILL, 1, "error: rank 1 of 2 failed (killed by SIGKILL); the other ranks were stopped"),
    (signal.SIGSTOP, 0, "error: rank 0 of 2 stopped responding (it is stopped: SIGSTOP or Ctrl-Z); "
                        "the other ranks were stopped"),
], ids=["killed-rank-1", "stopped-rank-0"])
def test_killed_or_stopped_rank_stops_the_run(long_ckpt, victim_signal, victim, expected):
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_export.cli", "run", "--checkpoint", str(long_ckpt), "--tp", "2",
         "--prompt-ids", "1,2,3", "--max-new-tokens", "8000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        ranks = []
        while time.monotonic() < deadline and len(ranks) < 2:
            ranks = [p for p in _children(proc.pid) if "llama_export.cli" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert len(ranks) == 2, "rank processes did not start"
        _wait_for_generation(proc, ranks)
        target = next(p for p in ranks if p.environ().get("RANK") == str(victim))
        t0 = time.monotonic()
        target.send_signal(victim_signal)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    assert elapsed < 60
    assert [ln for ln in err.splitlines() if ln.strip()] == [expected], err
    time.sleep(0.5)
    alive = [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"orphaned rank processes: {alive}"


def _wait_for_generation(proc: subprocess.Popen, ranks: list[psutil.Process], timeout: float = 120) -> None:
    """Until both ranks have joined the process group (TCP connections to the store and the peer), then
    3 s more: loaded and generating."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if all(len(p.net_connections(kind="tcp")) >= 2 for p in ranks):
            time.sleep(3)  # loaded and generating (the loop runs 8000 steps)
            return
        time.sleep(0.2)
    raise AssertionError("the ranks never connected")


@pytest.mark.slow
def test_killed_launcher_takes_its_ranks_with_it(long_ckpt):
    ckpt = long_ckpt
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_export.cli", "run", "--checkpoint", str(ckpt), "--tp", "2",
         "--prompt-ids", "1,2,3", "--max-new-tokens", "8000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        ranks = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(ranks) < 2:
            ranks = [p for p in _children(proc.pid) if "llama_export.cli" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert len(ranks) == 2
        time.sleep(4)
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=30)
        assert alive == [], f"ranks outlived their launcher: {alive}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
