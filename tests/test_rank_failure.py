"""A rank killed mid-generation ends the whole run quickly, naming the rank, leaving no processes."""

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


@pytest.mark.slow
@pytest.mark.parametrize("victim_signal", [signal.SIGKILL])
def test_killed_rank_stops_the_run(tmp_path, victim_signal):
    # A long context so that generation is still running when the rank is killed.
    cfg = dataclasses.replace(tiny_config("mha"), max_seq_len=8192)
    ckpt = write_meta(tmp_path / "ckpt", cfg, random_meta_state(cfg, seed=9))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_export.cli", "run", "--checkpoint", str(ckpt), "--tp", "2",
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
        time.sleep(6)  # past loading, into generation
        assert proc.poll() is None, proc.communicate()
        victim = next(p for p in ranks if p.environ().get("RANK") == "1")
        t0 = time.monotonic()
        victim.send_signal(victim_signal)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 60
    assert "rank 1 of 2 failed (killed by SIGKILL)" in err, err
    time.sleep(0.5)
    alive = [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"orphaned rank processes: {alive}"


@pytest.mark.slow
def test_killed_launcher_takes_its_ranks_with_it(tmp_path):
    cfg = dataclasses.replace(tiny_config("mha"), max_seq_len=8192)
    ckpt = write_meta(tmp_path / "ckpt", cfg, random_meta_state(cfg, seed=9))
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
