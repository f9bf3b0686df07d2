"""Communicators: the only way model code talks to other ranks.

Implementations of one small interface:
- `LocalComm`: TP=1, every collective is the identity.
- `DistComm`: `torch.distributed` (NCCL for CUDA tensors, gloo for CPU).
- `ExportComm`: emits `llama_export::all_reduce` / `all_gather` marker ops that export turns into
  `AllReduce` / `AllGather` nodes, where the partition pass later cuts the graph.
- `ThreadComm`: every rank as a thread of one process (validation and comparison).

Collectives take torch tensors or numpy arrays (the ONNX Runtime backend's) and return the same kind.
torch is imported by the communicators that need it, not by this module: a TP=1 run on ONNX Runtime
(`LocalComm`) never imports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llama_export.errors import PeerLostError

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch import Tensor


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
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # gloo sums half-precision tensors poorly (and not at all for bf16 in some builds): reduce in
        # fp32 and cast back. NCCL reduces natively.
        self._upcast = dist.get_backend(group) == "gloo"

    def all_reduce(self, x: Any) -> Any:
        import torch
        import torch.distributed as dist

        t, back = _as_torch(x)
        y = t.float() if (self._upcast and t.dtype != torch.float32) else t.clone()
        with peer_errors("all_reduce"):
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return back(y.to(t.dtype))

    def all_gather(self, x: Any, dim: int) -> Any:
        import torch
        import torch.distributed as dist

        t, back = _as_torch(x)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        with peer_errors("all_gather"):
            dist.all_gather(parts, t, group=self.group)
        return back(torch.cat(parts, dim=dim))


def _as_torch(x: Any):
    """(x as a torch tensor, a function turning a result back into x's kind): numpy arrays travel as
    zero-copy CPU tensors."""
    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)), lambda t: t.numpy()
    return x, lambda t: t


@contextmanager
def peer_errors(what: str, *, cause: str = "another rank died, stopped or timed out") -> Iterator[None]:
    """A collective library's error (gloo/NCCL: connection closed, timeout) as one `PeerLostError`
    line instead of its C++ traceback: the cause is another rank, which the launcher names (`cause`
    says what else it may be where there is no launcher)."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError is a RuntimeError
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise PeerLostError(f"{what} with the other ranks failed ({first[:160]}); {cause}") from None


# ---- export markers ------------------------------------------------------------------------------
@cache
def markers():
    """(all_reduce, all_gather): the `llama_export::` marker ops, registered with torch on first use.

    all_reduce(x, world_size) marks a sum over `world_size` ranks, all_gather(x, dim, world_size) a
    concatenation; both are only traced, never executed."""
    import torch

    # explicit schemas: the annotations are strings here (`from __future__ import annotations`)
    @torch.library.custom_op("llama_export::all_reduce", mutates_args=(), schema="(Tensor x, int world_size) -> Tensor")
    def all_reduce_marker(x: Tensor, world_size: int) -> Tensor:
        raise RuntimeError("llama_export::all_reduce is an export marker; run eager models with DistComm")

    @all_reduce_marker.register_fake
    def _(x: Tensor, world_size: int) -> Tensor:
        return torch.empty_like(x)

    @torch.library.custom_op("llama_export::all_gather", mutates_args=(),
                             schema="(Tensor x, int dim, int world_size) -> Tensor")
    def all_gather_marker(x: Tensor, dim: int, world_size: int) -> Tensor:
        raise RuntimeError("llama_export::all_gather is an export marker; run eager models with DistComm")

    @all_gather_marker.register_fake
    def _(x: Tensor, dim: int, world_size: int) -> Tensor:
        shape = list(x.shape)
        shape[dim] = shape[dim] * world_size
        return x.new_empty(shape)

    return all_reduce_marker, all_gather_marker


class ExportComm:
    """Communicator used while tracing rank `rank` of `world_size` for export."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: Tensor) -> Tensor:
        return markers()[0](x, self.world_size)

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        return markers()[1](x, dim % x.dim(), self.world_size)


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
        self.slots: list[Any] = [None] * world_size

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def exchange(self, rank: int, x: Any) -> list[Any]:
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

    def all_reduce(self, x: Any) -> Any:
        t, back = _as_torch(x)
        parts = self.group.exchange(self.rank, t)  # every rank hands over a torch tensor
        out = parts[0].float()  # fp32 accumulation, as DistComm does on gloo
        for p in parts[1:]:
            out = out + p.float()
        return back(out.to(t.dtype))

    def all_gather(self, x: Any, dim: int) -> Any:
        import torch

        t, back = _as_torch(x)
        return back(torch.cat(self.group.exchange(self.rank, t), dim=dim))
