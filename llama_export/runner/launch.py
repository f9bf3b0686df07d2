"""Process launch: the only code that reads RANK / WORLD_SIZE.

`launch_local(argv, world_size)` starts `world_size` copies of `python -m llama_export.cli ARGV` with the
environment `torchrun` would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then
watches them: when one exits non-zero, the others are terminated and a `RankFailedError` names the
first rank that failed and how. Under `torchrun`, the same worker code runs without this launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llama_export.errors import InputError, RankFailedError
from llama_export.parallel.comm import Communicator, DistComm, LocalComm

log = logging.getLogger(__name__)

# How long a collective may wait for a peer before the process group gives up.
COLLECTIVE_TIMEOUT = timedelta(seconds=45)
_WORKER_FLAG = "LLAMA_EXPORT_WORKER"


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int


def rank_env() -> RankEnv | None:
    """This process's rank, when started by `launch_local` or `torchrun`; None for a plain process."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return RankEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
    )


def die_with_launcher() -> None:
    """In a rank started by `launch_local`: exit when the launcher dies, so no rank is ever orphaned
    (Linux PR_SET_PDEATHSIG; elsewhere the launcher's own cleanup is the only guard)."""
    if os.environ.get(_WORKER_FLAG) != "1" or sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher is already gone
        sys.exit(1)


def init_process_group(env: RankEnv, device: torch.device) -> None:
    """NCCL for CUDA devices, gloo for CPU; bounded timeouts so a dead peer cannot hang us."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world_size, timeout=COLLECTIVE_TIMEOUT, **kwargs
    )


# work(rank environment, communicator, device) -> exit code, run once on every rank
RankWork = Callable[[RankEnv, Communicator, torch.device], int]


def on_ranks(tp: int, device: str, argv: list[str], work: RankWork) -> int:
    """Run `work` as this process's rank; returns the exit code.

    In a plain process, tp=1 runs `work` right here and tp>1 starts the rank processes with `argv`
    (`launch_local`), which come back here as ranks. In a rank process: join the process group, run
    `work`, and leave without tearing gloo down (see below)."""
    env = rank_env()
    if env is None:
        if tp > 1:
            return launch_local(argv, tp)
        env = RankEnv(rank=0, world_size=1, local_rank=0)
    die_with_launcher()
    if env.world_size != tp:
        raise InputError(f"started with WORLD_SIZE={env.world_size} but --tp {tp}; make them equal")
    dev = torch.device(device if device != "cuda" else f"cuda:{env.local_rank}")
    comm: Communicator = LocalComm()
    if env.world_size > 1:
        init_process_group(env, dev)
        comm = DistComm()
    try:
        code = work(env, comm, dev)
        if dist.is_initialized():
            dist.barrier()  # every rank is done with the group
            # gloo's teardown (destroy_process_group, or interpreter exit with the group alive) sometimes
            # aborts a rank ("terminate called without an active exception", SIGABRT) after all work is
            # done, turning a finished run into a failed one. A finished rank process therefore leaves
            # without running C++ destructors; its output is flushed first.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


def launch_local(argv: list[str], world_size: int, *, poll_s: float = 0.1, grace_s: float = 5.0) -> int:
    """Run `llama_export.cli argv` as `world_size` rank processes; return 0 or raise RankFailedError."""
    port = _free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **{_WORKER_FLAG: "1"},
        )
        # Keep the ranks from fighting over the cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
        procs.append(subprocess.Popen([sys.executable, "-m", "llama_export.cli", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # Seen in the same poll: a rank killed by a signal is the cause, the others its echo
                # (their collective with it broke).
                rank, code = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
                _terminate(procs, grace_s)
                raise RankFailedError(
                    f"rank {rank} of {world_size} failed ({_describe_exit(code)}); the other ranks were stopped"
                )
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _terminate(procs, grace_s)
        raise
    finally:
        _terminate(procs, grace_s)


def _terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
