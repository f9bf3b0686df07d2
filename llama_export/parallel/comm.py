"""Communicators: the only way model code talks to other ranks.

Implementations of one small interface:
- `LocalComm`: TP=1, every collective is the identity.
- `DistComm`: `torch.distributed` (NCCL for CUDA tensors, gloo for CPU).
- `ExportComm`: emits `llama_export::all_reduce` / `all_gather` marker ops that export turns into
  `AllReduce` / `AllGather` nodes, where the partition pass later cuts the graph.
- `ThreadComm`: every rank as a thread of one process (validation and comparison).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from llama_export.errors import PeerLostError


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over all ranks (out of place)."""
        ...

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        """Concatenation of every rank's `x` along `dim`, in rank order."""
        ...


class LocalComm:
    """Single-rank communicator."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: Tensor) -> Tensor:
        return x

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        return x


class DistComm:
    """`torch.distributed` communicator over the default (or a given) process group."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # gloo sums half-precision tensors poorly (and not at all for bf16 in some builds): reduce in
        # fp32 and cast back. NCCL reduces natively.
        self._upcast = dist.get_backend(group) == "gloo"

    def all_reduce(self, x: Tensor) -> Tensor:
        y = x.float() if (self._upcast and x.dtype != torch.float32) else x.clone()
        with peer_errors("all_reduce"):
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y.to(x.dtype)

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        with peer_errors("all_gather"):
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


@contextmanager
def peer_errors(what: str) -> Iterator[None]:
    """A collective library's error (gloo/NCCL: connection closed, timeout) as one `PeerLostError`
    line instead of its C++ traceback: the cause is another rank, which the launcher names."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError is a RuntimeError
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise PeerLostError(f"{what} with the other ranks failed ({first[:160]}); "
                            "another rank died, stopped or timed out") from None


# ---- export markers ------------------------------------------------------------------------------
@torch.library.custom_op("llama_export::all_reduce", mutates_args=())
def all_reduce_marker(x: Tensor, world_size: int) -> Tensor:
    """Marker for a sum over `world_size` ranks; only traced, never executed."""
    raise RuntimeError("llama_export::all_reduce is an export marker; run eager models with DistComm")


@all_reduce_marker.register_fake
def _(x: Tensor, world_size: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llama_export::all_gather", mutates_args=())
def all_gather_marker(x: Tensor, dim: int, world_size: int) -> Tensor:
    """Marker for a concatenation over `world_size` ranks; only traced, never executed."""
    raise RuntimeError("llama_export::all_gather is an export marker; run eager models with DistComm")


@all_gather_marker.register_fake
def _(x: Tensor, dim: int, world_size: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] * world_size
    return x.new_empty(shape)


class ExportComm:
    """Communicator used while tracing rank `rank` of `world_size` for export."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: Tensor) -> Tensor:
        return all_reduce_marker(x, self.world_size)

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        return all_gather_marker(x, dim % x.dim(), self.world_size)


# ---- all ranks in one process --------------------------------------------------------------------
class ThreadGroup:
    """Runs every rank of a TP group as a thread of this process, with real data exchange.

    Used by export validation and `compare` to check all ranks without starting processes; the rank
    code is exactly what runs under `DistComm`. Sums are taken in rank order on every rank, so all
    ranks see bit-identical results. A rank that raises breaks the barrier, so no rank can hang.
    """

    def __init__(self, world_size: int, *, timeout_s: float = 120.0) -> None:
        import threading

        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.slots: list[Tensor | None] = [None] * world_size

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def exchange(self, rank: int, x: Tensor) -> list[Tensor]:
        self.slots[rank] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return parts  # type: ignore[return-value]

    def run(self, fn):
        """`[fn(rank, comm) for every rank]`, each rank in its own thread; re-raises the first error."""
        import threading

        results: list = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.comm(rank))
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                errors[rank] = e
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                     next((e for e in errors if e is not None), None))
        if first is not None:
            raise first
        return results


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def all_reduce(self, x: Tensor) -> Tensor:
        parts = self.group.exchange(self.rank, x)
        out = parts[0].float()  # fp32 accumulation, as DistComm does on gloo
        for p in parts[1:]:
            out = out + p.float()
        return out.to(x.dtype)

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        return torch.cat(self.group.exchange(self.rank, x), dim=dim)
