"""The launcher: `launch_local(argv, world_size)` starts `world_size` copies of `python -m
llama_export.cli ARGV` with the environment `torchrun` would give them (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), then watches them (`_Watch`) and names the rank that caused a failure. Under
`torchrun`, the same worker code runs without it. `on_ranks` runs a command's work as this process's
rank, starting the ranks first where needed. The rank side of the protocol is `runner.env`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from llama_export.clock import process_start
from llama_export.errors import InputError, RankFailedError
from llama_export.files import write_atomic
from llama_export.runner.devices import check_gpus_for_ranks, rank_device
from llama_export.runner.env import (
    CLOSED_OUTPUT_EXIT,
    HANDOFF_NAME,
    RUN_DIR,
    STARTED_AT,
    THREADS,
    WORKER_FLAG,
    FailureKind,
    RankEnv,
    handoff_json,
    init_process_group,
    join_launcher,
    leave_rank,
    rank_env,
)
from llama_export.runner.threads import rank_threads

if TYPE_CHECKING:
    from llama_export.parallel.comm import Communicator

# Signs of life: a rank silent for HEARTBEAT_TIMEOUT_S (well under the collective timeout) or stopped
# for STOPPED_S has stopped responding. A rank that failed only because its peer did is named only if
# no better cause shows up within CAUSE_WAIT_S.
HEARTBEAT_TIMEOUT_S = 20.0
STOPPED_S = 2.0
STARTUP_S = 120.0
CAUSE_WAIT_S = 3.0


# work(rank environment, communicator, device ("cpu", "cuda:N"), CPU threads) -> exit code, run once on
# every rank. The work applies the thread count to the libraries it uses (torch, ONNX Runtime sessions).
RankWork = Callable[[RankEnv, "Communicator", str, int], int]


def on_ranks(tp: int, device: str, argv: list[str], work: RankWork, *, threads: int | None = None,
             handoff: object | None = None) -> int:
    """Run `work` as this process's rank; returns the exit code.

    In a plain process, tp=1 runs `work` right here and tp>1 starts the rank processes with `argv`
    (`launch_local`, handing them `handoff`: what this process resolved and validated for them, read back
    with `env.read_handoff`), which come back here as ranks. In a rank process: join the launcher's
    channel and the process group on this rank's device (`devices.rank_device`: cuda:LOCAL_RANK, made
    current; more ranks than GPUs are refused before they start), decide the thread count
    (`rank_threads`, decided once by the launcher), run `work`, and leave without tearing gloo down
    (`leave_rank`). A single rank on the CPU imports no torch here."""
    from llama_export.parallel.comm import LocalComm

    env = rank_env()
    n_threads = rank_threads(threads, tp)
    if env is None:
        check_gpus_for_ranks(device, tp)  # before any rank starts: all tp ranks run on this machine
        if tp > 1:
            return launch_local(argv, tp, threads=n_threads, handoff=handoff)
        env = RankEnv(rank=0, world_size=1, local_rank=0)
    join_launcher()
    if env.world_size != tp:
        raise InputError(f"started with WORLD_SIZE={env.world_size} but --tp {tp}; make them equal")
    dev = rank_device(device, env.local_rank)
    if env.world_size == 1:
        return work(env, LocalComm(), dev, n_threads)
    import torch.distributed as dist

    from llama_export.parallel.comm import DistComm, peer_errors

    init_process_group(env, dev)
    code = work(env, DistComm(), dev, n_threads)
    if dist.is_initialized():
        with peer_errors("the final barrier"):
            dist.barrier()  # every rank is done with the group
        leave_rank(code)
    return code


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---- the launcher --------------------------------------------------------------------------------

def launch_local(argv: list[str], world_size: int, *, threads: int | None = None, handoff: object | None = None,
                 poll_s: float = 0.1, grace_s: float = 5.0) -> int:
    """Run `llama_export.cli argv` as `world_size` rank processes; return 0 or raise RankFailedError
    with one line naming the rank that failed, was killed, or stopped responding (see `_Watch`).
    `handoff` (a dataclass) is written to the run folder before the ranks start (`env.read_handoff`)."""
    port = _free_port()
    started = process_start(os.getpid())
    run_dir = Path(tempfile.mkdtemp(prefix="llama_export-run-"))
    procs: list[subprocess.Popen] = []
    try:
        if handoff is not None:
            write_atomic(run_dir / HANDOFF_NAME, handoff_json(handoff))
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                **{WORKER_FLAG: "1", RUN_DIR: str(run_dir)},
            )
            if threads is not None:  # decided once, here, for every rank
                env.update(OMP_NUM_THREADS=str(threads), **{THREADS: str(threads)})
            if started is not None:
                env[STARTED_AT] = repr(started)
            procs.append(subprocess.Popen([sys.executable, "-m", "llama_export.cli", *argv], env=env))
        watch = _Watch(procs, run_dir)
        while True:
            if all(p.poll() == 0 for p in procs):
                return 0
            if any(p.poll() == CLOSED_OUTPUT_EXIT for p in procs):  # the output's reader left: not a failure
                _terminate(procs, grace_s)
                raise BrokenPipeError(errno.EPIPE, "the standard output's reader closed it")
            verdict = watch.verdict(time.monotonic())
            if verdict is not None:
                _terminate(procs, grace_s)
                raise RankFailedError(f"{verdict}; the other ranks were stopped")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _terminate(procs, grace_s)
        raise
    finally:
        _terminate(procs, grace_s)
        shutil.rmtree(run_dir, ignore_errors=True)


class _Watch:
    """Decides which rank to blame, from exit codes, the ranks' reports and their signs of life.

    In order: a rank killed by a signal; a rank stopped (SIGSTOP, Ctrl-Z of one process) for
    `STOPPED_S` or silent for `HEARTBEAT_TIMEOUT_S` (less than the collective timeout, so it is named
    before its peers time out waiting for it); a rank that reported its own error; a rank interrupted.
    Ranks that only lost their peers are echoes: they are named only when nothing better appears
    within `CAUSE_WAIT_S`.
    """

    def __init__(self, procs: list[subprocess.Popen], run_dir: Path) -> None:
        self.procs = procs
        self.run_dir = run_dir
        self.n = len(procs)
        self.started = time.monotonic()
        self.stopped_since: dict[int, float] = {}
        self.first_failure: float | None = None

    def _report(self, rank: int) -> dict | None:
        try:
            d = json.loads((self.run_dir / f"rank{rank}.json").read_text())
            return d if isinstance(d, dict) and isinstance(d.get("message"), str) else None
        except (OSError, ValueError):
            return None

    def _silent_for(self, rank: int, now_wall: float) -> float:
        try:
            return now_wall - (self.run_dir / f"rank{rank}.beat").stat().st_mtime
        except OSError:  # not beating yet (still importing torch, which can take long on a busy machine)
            return time.monotonic() - self.started - STARTUP_S + HEARTBEAT_TIMEOUT_S

    def _hung(self, now: float) -> str | None:
        now_wall = time.time()
        for r, p in enumerate(self.procs):
            if p.poll() is not None:
                continue
            try:
                stopped = psutil.Process(p.pid).status() == psutil.STATUS_STOPPED
            except psutil.Error:
                stopped = False
            if not stopped:
                self.stopped_since.pop(r, None)
            elif now - self.stopped_since.setdefault(r, now) >= STOPPED_S:
                return f"rank {r} of {self.n} stopped responding (it is stopped: SIGSTOP or Ctrl-Z)"
            if self._silent_for(r, now_wall) > HEARTBEAT_TIMEOUT_S:
                return f"rank {r} of {self.n} stopped responding (no sign of life for {HEARTBEAT_TIMEOUT_S:.0f} s)"
        return None

    def verdict(self, now: float) -> str | None:
        codes = [p.poll() for p in self.procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        killed = [r for r in failed if codes[r] < 0 and self._report(r) is None]
        if killed:
            r = killed[0]
            return f"rank {r} of {self.n} failed ({_describe_exit(codes[r])})"
        hung = self._hung(now)
        if hung:
            return hung
        if not failed:
            return None
        if self.first_failure is None:
            self.first_failure = now
        reports = {r: self._report(r) for r in failed}
        for kind in (FailureKind.OWN, FailureKind.INTERRUPTED):
            for r, rep in reports.items():
                if rep is not None and rep.get("kind") == kind.value:
                    return f"rank {r} of {self.n}: {rep['message']}" if kind is FailureKind.OWN \
                        else f"rank {r} of {self.n} was interrupted"
        running = [r for r, c in enumerate(codes) if c is None]
        if now - self.first_failure < CAUSE_WAIT_S and running:
            return None  # only echoes so far: give the cause a moment to show itself
        if running and all(rep is not None and rep.get("kind") == FailureKind.PEER.value for rep in reports.values()):
            return (f"rank {running[0]} of {self.n} stopped responding (rank {failed[0]} timed out or lost "
                    "its connection waiting for it)")
        r = failed[0]
        rep = reports[r]
        return f"rank {r} of {self.n}: {rep['message']}" if rep else \
            f"rank {r} of {self.n} failed ({_describe_exit(codes[r])})"


def _terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGCONT)  # a stopped rank handles SIGTERM only once continued
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
