"""Communicators: gloo's half-precision sums (done in fp32) and the in-process ThreadGroup's failure path."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama_export.parallel.comm import DistComm, ThreadGroup


def _gloo_worker(rank: int, world: int, init: str, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    comm = DistComm()
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(100 + rank)
        x = (torch.randn(257, generator=g) * 300).to(dtype)
        y = comm.all_reduce(x)
        out[str(dtype)] = (x, y)
    out["gather"] = comm.all_gather(torch.full((2, 3), float(rank)).half(), dim=1)
    results[rank] = out
    dist.barrier()
    dist.destroy_process_group()


def test_gloo_sums_half_precision_in_fp32_and_keeps_the_dtype(tmp_path):
    world = 3
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_gloo_worker, args=(world, f"file://{tmp_path / 'store'}", results), nprocs=world,
                       start_method="spawn", join=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xs = [results[r][str(dtype)][0] for r in range(world)]
        # fp32 accumulation, one rounding at the end. Three half-precision values sum exactly in fp32
        # whatever the order, so the half results are bit-exact; fp32 itself depends on gloo's order.
        want = sum(x.float() for x in xs).to(dtype)
        for r in range(world):
            y = results[r][str(dtype)][1]
            assert y.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-4)
            else:
                assert torch.equal(y, want), f"{dtype} rank {r}"
    # fp16 accumulation in rank order would round twice; the values above are large enough to show it.
    xs = [results[r]["torch.float16"][0] for r in range(world)]
    twice = (xs[0] + xs[1]) + xs[2]
    assert not torch.equal(twice, results[0]["torch.float16"][1])
    gathered = results[1]["gather"]
    assert gathered.shape == (2, 9) and gathered.dtype == torch.float16
    assert gathered[0].tolist() == [0.0] * 3 + [1.0] * 3 + [2.0] * 3


def test_thread_group_reraises_the_failing_rank_error_and_nobody_hangs():
    group = ThreadGroup(3, timeout_s=30)

    def rank_fn(rank, comm):
        if rank == 1:
            raise ValueError("rank 1 broke")
        return comm.all_reduce(torch.ones(2))  # ranks 0 and 2 wait here for rank 1

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 broke"):
        group.run(rank_fn)
    assert time.monotonic() - t0 < 10
    assert threading.active_count() < 10  # the rank threads are gone


def test_thread_group_sums_in_rank_order_on_every_rank():
    group = ThreadGroup(2)
    outs = group.run(lambda rank, comm: comm.all_reduce(torch.tensor([rank + 0.5], dtype=torch.float16)))
    assert outs[0].tolist() == outs[1].tolist() == [2.0]
    assert all(o.dtype == torch.float16 for o in outs)
