"""The rank side of a run: the only code that reads RANK / WORLD_SIZE, the process group, and the
channel through which a rank started by the launcher (`runner.launch`) reports.

One line per failure, across processes: the launcher makes a run folder; each rank touches
`rank<r>.beat` every second (`join_launcher`) and, when it fails, writes its one-line error to
`rank<r>.json` (`report_failure`) and exits without printing. The launcher then prints one line naming
the rank that caused the failure, not the peers whose collectives broke because of it.

    launcher ──RANK, WORLD_SIZE, LLAMA_EXPORT_RUN_DIR──► rank 0 … rank N-1
        │   ▲                                                 │
        │   └── rank<r>.beat (mtime), rank<r>.json {message, kind} ┘
        └────── handoff.json: what the launcher resolved and validated once for every rank
                (`read_handoff`; a command's own dataclass, written before the ranks start)

torch is imported only inside the functions that need it: the CLI reports a failure through this
module even when it happens while torch is still being imported (Ctrl-C during start-up).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from llama_export.clock import now as clock_now
from llama_export.clock import process_start
from llama_export.errors import InputError, LlamaExportError
from llama_export.files import write_atomic
from llama_export.parsing import parse_json, read_bytes

# A process whose stdout reader left (`| head`) exits quietly with this code, as if killed by SIGPIPE;
# the launcher passes it on rather than blaming the rank.
CLOSED_OUTPUT_EXIT = 128 + signal.SIGPIPE
# How long a collective may wait for a peer before the process group gives up.
COLLECTIVE_TIMEOUT = timedelta(seconds=45)
# A rank shows signs of life every HEARTBEAT_S (the launcher's watch decides what silence means).
HEARTBEAT_S = 1.0
T = TypeVar("T")
# What the launcher sets in a rank's environment beside torchrun's variables.
WORKER_FLAG = "LLAMA_EXPORT_WORKER"  # "1": started by `runner.launch.launch_local`
RUN_DIR = "LLAMA_EXPORT_RUN_DIR"  # the run folder of heartbeats and failure reports
HANDOFF_NAME = "handoff.json"  # in the run folder: what the launcher decided for every rank
THREADS = "LLAMA_EXPORT_THREADS"  # the thread count the launcher decided for every rank
STARTED_AT = "LLAMA_EXPORT_STARTED_AT"  # the launcher's start (`clock.process_start`)


def started_by_launcher() -> bool:
    """True in a rank process that `runner.launch.launch_local` started."""
    return os.environ.get(WORKER_FLAG) == "1"


def seconds_since_start() -> float | None:
    """Seconds since the command started: this process, or the `launch_local` launcher that started
    this rank (`clock`: 10 ms resolution on Linux); None where that cannot be read."""
    started = process_start(os.getpid())
    launcher = os.environ.get(STARTED_AT) if started_by_launcher() else None
    if launcher is not None:
        try:
            started = float(launcher)
        except ValueError:
            pass
    return None if started is None else clock_now() - started


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int


# What torchrun and `launch_local` always set beside RANK / WORLD_SIZE: where the ranks meet.
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")
_STALE_HINT = "unset RANK and WORLD_SIZE (left over from another job?), or start every rank with torchrun"


def rank_env() -> RankEnv | None:
    """This process's rank, when started by `launch_local` or `torchrun`; None for a plain process.

    RANK / WORLD_SIZE without MASTER_ADDR / MASTER_PORT are refused: no launcher started this
    process, and waiting for peers that will never come would only time out."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    if missing := [k for k in RENDEZVOUS if not os.environ.get(k)]:
        raise InputError(f"the environment sets RANK={os.environ['RANK']} and WORLD_SIZE={os.environ['WORLD_SIZE']} "
                         f"but not {' or '.join(missing)}, so no launcher started this process; {_STALE_HINT}")
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
    if not started_by_launcher() or sys.platform != "linux":
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


def init_process_group(env: RankEnv, device: str) -> None:
    """NCCL for CUDA devices, gloo for CPU; bounded timeouts so a dead peer cannot hang us."""
    import torch
    import torch.distributed as dist

    from llama_export.parallel.comm import peer_errors

    cuda = device.startswith("cuda")
    kwargs = {"device_id": torch.device(device)} if cuda else {}
    if started_by_launcher():  # the launcher knows its ranks: it names the one that did not come
        joining = peer_errors("joining the process group")
    else:  # torchrun, or a shell's stale variables: there may be no other rank at all
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        joining = peer_errors(f"joining the process group at {where}",
                              cause=f"if no other ranks were started, {_STALE_HINT}")
    with joining:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", rank=env.rank, world_size=env.world_size,
            timeout=COLLECTIVE_TIMEOUT, **kwargs
        )


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
    folder = os.environ.get(RUN_DIR)
    if not folder or not started_by_launcher():
        return None
    try:
        env = rank_env()
    except InputError:
        return None  # a rank environment that is not one: the caller prints its error itself
    return None if env is None else Path(folder) / f"rank{env.rank}.{suffix}"


# ---- what the launcher hands down ----------------------------------------------------------------

def handoff_json(value: object) -> str:
    """A command's handoff (a dataclass of JSON-able fields) as the launcher writes it."""
    return json.dumps(dataclasses.asdict(value))


def plan_once(schema: type[T], make_plan: Callable[[], T], *, first: Callable[[], None]) -> T:
    """A command's plan, made once for every rank: in a plain process (the launcher, or the only rank)
    `first()` then `make_plan()`; in a rank the launcher started, what it handed down; under torchrun
    (nothing handed down), each rank's own `make_plan()`."""
    if rank_env() is None:
        first()
        return make_plan()
    return read_handoff(schema) or make_plan()


def read_handoff(schema: type[T]) -> T | None:
    """In a rank started by `launch_local`: what the launcher resolved and validated once for every
    rank (`launch_local(handoff=...)`), parsed strictly into `schema`. None elsewhere (a plain process,
    or a rank under torchrun, which resolves everything itself) or where the launcher handed nothing."""
    folder = os.environ.get(RUN_DIR)
    if not folder or not started_by_launcher() or not (Path(folder) / HANDOFF_NAME).is_file():
        return None
    path = Path(folder) / HANDOFF_NAME
    return parse_json(read_bytes(path, error=LlamaExportError), schema, source=str(path),
                      fix="a launcher and its ranks run the same llama_export; run it again", error=LlamaExportError)
