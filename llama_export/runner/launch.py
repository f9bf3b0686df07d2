"""Process launch: the only code that reads RANK / WORLD_SIZE.

`launch_local(argv, world_size)` starts `world_size` copies of `python -m llama_export.cli ARGV` with the
environment `torchrun` would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then
watches them. Under `torchrun`, the same worker code runs without this launcher.

One line per failure, across processes: the launcher makes a run folder; each rank touches
`rank<r>.beat` every second (`join_launcher`) and, when it fails, writes its one-line error to
`rank<r>.json` (`report_failure`) and exits without printing. The launcher then prints one line naming
the rank that caused the failure (`_Watch`), not the peers whose collectives broke because of it.

    launcher ──RANK, WORLD_SIZE, LLAMA_EXPORT_RUN_DIR──► rank 0 … rank N-1
        ▲                                                     │
        └── rank<r>.beat (mtime), rank<r>.json {message, kind} ┘

torch is imported only inside the functions that need it: the CLI reports a failure through this
module even when it happens while torch is still being imported (Ctrl-C during start-up).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from llama_export.errors import InputError, RankFailedError
from llama_export.files import write_atomic

if TYPE_CHECKING:
    from llama_export.parallel.comm import Communicator

log = logging.getLogger(__name__)

# How long a collective may wait for a peer before the process group gives up.
COLLECTIVE_TIMEOUT = timedelta(seconds=45)
# Signs of life: a rank beats every HEARTBEAT_S; one silent for HEARTBEAT_TIMEOUT_S (well under the
# collective timeout) or stopped for STOPPED_S has stopped responding. A rank that failed only because
# its peer did is named only if no better cause shows up within CAUSE_WAIT_S.
HEARTBEAT_S = 1.0
HEARTBEAT_TIMEOUT_S = 20.0
STOPPED_S = 2.0
STARTUP_S = 120.0
CAUSE_WAIT_S = 3.0
_WORKER_FLAG = "LLAMA_EXPORT_WORKER"
_RUN_DIR = "LLAMA_EXPORT_RUN_DIR"
_THREADS = "LLAMA_EXPORT_THREADS"
_STARTED_AT = "LLAMA_EXPORT_STARTED_AT"  # the launcher's start, seconds after boot (Linux)


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int


def rank_env() -> RankEnv | None:
    """This process's rank, when started by `launch_local` or `torchrun`; None for a plain process."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(key, os.environ["RANK"])
        if not text.isdigit():
            raise InputError(f"the environment sets {key}={text!r}; it must be a non-negative integer "
                             "(set by torchrun or llama-export itself)")
        values[key] = int(text)
    if not values["RANK"] < values["WORLD_SIZE"]:
        raise InputError(f"RANK={values['RANK']} is not below WORLD_SIZE={values['WORLD_SIZE']}")
    return RankEnv(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])


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


def leave_rank(code: int) -> None:
    """End a rank process that joined a process group, without gloo's teardown.

    gloo's teardown (destroy_process_group, or interpreter exit with the group alive) sometimes aborts
    a rank ("terminate called without an active exception", SIGABRT) after all work is done, turning a
    finished run into a failed one, and after a failure it adds its own noise. Such a rank therefore
    leaves without running C++ destructors; its output is flushed first. A no-op elsewhere."""
    dist = sys.modules.get("torch.distributed")  # not imported yet: no process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _boot_clock() -> tuple[float, float] | None:
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
    clock = _boot_clock()
    if clock is None:
        return None
    now, started = clock
    launcher = os.environ.get(_STARTED_AT) if os.environ.get(_WORKER_FLAG) == "1" else None
    if launcher is not None:
        try:
            started = float(launcher)
        except ValueError:
            pass
    return now - started


def _cpu_sample() -> tuple[float, list, float]:
    """(monotonic time, the machine's per-core CPU times, this process's CPU time)."""
    return time.monotonic(), psutil.cpu_times(percpu=True), time.process_time()


_STARTED = _cpu_sample()  # the window `rank_threads` looks at opens when this module is imported
_MIN_WINDOW_S = 0.1
_MAX_WINDOW_S = 2.0  # later than this (a long-lived process), the load is measured afresh


def _busy(t) -> float:
    """Seconds a core spent working (psutil's own definition: not idle, not waiting for I/O)."""
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


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
    decided = os.environ.get(_THREADS) if os.environ.get(_WORKER_FLAG) == "1" else None
    if decided is not None and decided.isdigit() and int(decided) >= 1:
        return int(decided)
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = list(range(os.cpu_count() or 1))
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


def init_process_group(env: RankEnv, device: str) -> None:
    """NCCL for CUDA devices, gloo for CPU; bounded timeouts so a dead peer cannot hang us."""
    import torch
    import torch.distributed as dist

    from llama_export.parallel.comm import peer_errors

    cuda = device.startswith("cuda")
    kwargs = {"device_id": torch.device(device)} if cuda else {}
    with peer_errors("joining the process group"):
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", rank=env.rank, world_size=env.world_size,
            timeout=COLLECTIVE_TIMEOUT, **kwargs
        )


# work(rank environment, communicator, device ("cpu", "cuda:N"), CPU threads) -> exit code, run once on
# every rank. The work applies the thread count to the libraries it uses (torch, ONNX Runtime sessions).
RankWork = Callable[[RankEnv, "Communicator", str, int], int]


def on_ranks(tp: int, device: str, argv: list[str], work: RankWork, *, threads: int | None = None) -> int:
    """Run `work` as this process's rank; returns the exit code.

    In a plain process, tp=1 runs `work` right here and tp>1 starts the rank processes with `argv`
    (`launch_local`), which come back here as ranks. In a rank process: join the launcher's channel and
    the process group, decide the thread count (`rank_threads`, decided once by the launcher), run
    `work`, and leave without tearing gloo down (`leave_rank`). A single rank imports no torch here."""
    from llama_export.parallel.comm import LocalComm

    env = rank_env()
    n_threads = rank_threads(threads, tp)
    if env is None:
        if tp > 1:
            return launch_local(argv, tp, threads=n_threads)
        env = RankEnv(rank=0, world_size=1, local_rank=0)
    join_launcher()
    if env.world_size != tp:
        raise InputError(f"started with WORLD_SIZE={env.world_size} but --tp {tp}; make them equal")
    dev = device if device != "cuda" else f"cuda:{env.local_rank}"
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


# ---- the rank side of the channel to the launcher ------------------------------------------------

class FailureKind(str, enum.Enum):
    OWN = "own"  # this rank's own error (bad input, a file, memory...)
    PEER = "peer"  # a collective failed because of another rank (`PeerLostError`)
    INTERRUPTED = "interrupted"  # SIGINT / SIGTERM


def join_launcher() -> None:
    """In a rank started by `launch_local`: exit when the launcher dies, and show signs of life (a
    heartbeat file the launcher watches, so that a stopped or hung rank is told apart from the healthy
    rank that times out waiting for it)."""
    die_with_launcher()
    beat = _channel_file("beat")
    if beat is None:
        return

    def run() -> None:
        while True:
            try:
                beat.touch()
            except OSError:
                return  # the launcher removed the run folder: it is finishing
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=run, name="llama_export-heartbeat", daemon=True).start()


def report_failure(message: str, kind: FailureKind) -> bool:
    """In a rank started by `launch_local`: hand the one-line error to the launcher, which prints one
    line for the whole run. False where there is no launcher (the caller prints it)."""
    path = _channel_file("json")
    if path is None:
        return False
    try:
        write_atomic(path, json.dumps({"message": message, "kind": kind.value}))
    except OSError:
        return False
    return True


def _channel_file(suffix: str) -> Path | None:
    folder, env = os.environ.get(_RUN_DIR), rank_env()
    if not folder or env is None or os.environ.get(_WORKER_FLAG) != "1":
        return None
    return Path(folder) / f"rank{env.rank}.{suffix}"


# ---- the launcher --------------------------------------------------------------------------------

def launch_local(argv: list[str], world_size: int, *, threads: int | None = None, poll_s: float = 0.1,
                 grace_s: float = 5.0) -> int:
    """Run `llama_export.cli argv` as `world_size` rank processes; return 0 or raise RankFailedError
    with one line naming the rank that failed, was killed, or stopped responding (see `_Watch`)."""
    port = _free_port()
    clock = _boot_clock()
    run_dir = Path(tempfile.mkdtemp(prefix="llama_export-run-"))
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                **{_WORKER_FLAG: "1", _RUN_DIR: str(run_dir)},
            )
            if threads is not None:  # decided once, here, for every rank
                env.update(OMP_NUM_THREADS=str(threads), **{_THREADS: str(threads)})
            if clock is not None:
                env[_STARTED_AT] = repr(clock[1])
            procs.append(subprocess.Popen([sys.executable, "-m", "llama_export.cli", *argv], env=env))
        watch = _Watch(procs, run_dir)
        while True:
            if all(p.poll() == 0 for p in procs):
                return 0
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
