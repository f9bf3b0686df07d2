"""One GPU per rank, checked on a machine without one: torch's device count is mocked.

More ranks on this machine than visible GPUs is one line before any rank starts (not a rank failing on
an invalid ordinal, or two ranks sharing a GPU inside NCCL); each rank makes cuda:LOCAL_RANK current
before the process group and its work.
"""

from __future__ import annotations

import pytest
import torch

from llama_export.errors import InputError
from llama_export.runner import devices, launch
from llama_export.runner.env import RankEnv


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` GPUs; records torch.cuda.set_device calls."""
    calls = []

    def set_gpus(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(str(torch.device(d))))
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return calls

    return set_gpus


def _no_launch(*a, **k):
    raise AssertionError("ranks were started")


@pytest.mark.parametrize("tp,n", [(4, 2), (2, 1), (8, 4)])
def test_more_ranks_than_gpus_is_refused_before_ranks_start(gpus, monkeypatch, tp, n):
    gpus(n)
    monkeypatch.setattr(launch, "rank_env", lambda: None)
    monkeypatch.setattr(launch, "launch_local", _no_launch)
    with pytest.raises(InputError) as e:
        launch.on_ranks(tp, "cuda", [], lambda *a: 0)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"--tp {tp} --device cuda needs one GPU per rank and {n} GPU(s) are visible" in msg
    assert f"use --tp {n} or less" in msg and "--device cpu" in msg


def test_as_many_ranks_as_gpus_start(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setattr(launch, "rank_env", lambda: None)
    started = []
    monkeypatch.setattr(launch, "launch_local", lambda argv, n, **k: started.append(n) or 0)
    assert launch.on_ranks(2, "cuda", [], lambda *a: 0) == 0 and started == [2]


def test_visible_devices_are_named(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(InputError, match=r"1 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES=3\)"):
        devices.check_gpus_for_ranks("cuda", 2)


def test_one_explicit_gpu_for_several_ranks_is_refused(gpus):
    gpus(4)
    with pytest.raises(InputError, match=r"--device cuda:1 puts all 2 ranks on one GPU.*use --device cuda"):
        devices.check_gpus_for_ranks("cuda:1", 2)
    devices.check_gpus_for_ranks("cuda:1", 1)  # one rank on a GPU of its choice is fine


def test_no_gpu_is_refused(gpus):
    gpus(0)
    with pytest.raises(InputError, match="sees no CUDA device; use --device cpu"):
        devices.check_gpus_for_ranks("cuda", 1)


def test_cpu_runs_are_not_checked(gpus):
    gpus(0)
    devices.check_gpus_for_ranks("cpu", 8)
    assert devices.rank_device("cpu", 3) == "cpu"


@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_rank_makes_its_gpu_current_before_its_work(gpus, monkeypatch, local_rank):
    calls = gpus(2)
    monkeypatch.setattr(launch, "rank_env", lambda: RankEnv(rank=local_rank, world_size=1, local_rank=local_rank))
    monkeypatch.setattr(launch, "join_launcher", lambda: None)
    seen = []

    def work(env, comm, dev, threads):
        seen.append((dev, list(calls)))
        return 0

    assert launch.on_ranks(1, "cuda", [], work) == 0
    assert seen == [(f"cuda:{local_rank}", [f"cuda:{local_rank}"])]


def test_a_rank_past_the_last_gpu_says_so(gpus, monkeypatch):
    calls = gpus(2)
    with pytest.raises(InputError, match=r"LOCAL_RANK=2\) would use cuda:2 and 2 GPU\(s\) are visible"):
        devices.rank_device("cuda", 2)
    assert calls == []
