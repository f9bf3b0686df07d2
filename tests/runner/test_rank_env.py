"""A rank environment is what a launcher gives (RANK, WORLD_SIZE and where to meet): stale RANK /
WORLD_SIZE in a user's shell are refused at once, and a join that finds no peers says where it waited."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta

import pytest

from llama_export.errors import InputError, PeerLostError
from llama_export.runner import env as rank_env_module
from llama_export.runner.env import RankEnv, init_process_group, rank_env
from tests.helpers import REPO

_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLAMA_EXPORT_WORKER")


@pytest.fixture
def clean_env(monkeypatch):
    for k in _RANK_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_no_rank_variables_is_a_plain_process(clean_env):
    assert rank_env() is None


def test_torchrun_variables_are_a_rank(clean_env):
    for k, v in dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        clean_env.setenv(k, v)
    assert rank_env() == RankEnv(rank=1, world_size=2, local_rank=1)


@pytest.mark.parametrize("given", [{}, {"MASTER_ADDR": "127.0.0.1"}, {"MASTER_PORT": "29500"}])
def test_rank_variables_without_a_rendezvous_are_refused(clean_env, given):
    for k, v in dict(RANK="1", WORLD_SIZE="2", **given).items():
        clean_env.setenv(k, v)
    with pytest.raises(InputError, match=r"RANK=1 and WORLD_SIZE=2 but not MASTER_.*; unset RANK and WORLD_SIZE"):
        rank_env()


def test_a_join_without_peers_names_the_address_and_the_stale_variables():
    """Rank 1 of 2 whose rank 0 never comes: the join times out (shortened here) naming MASTER_ADDR:PORT.
    In its own process: a failed join leaves torch.distributed state behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    code = ("import os, sys\nfrom datetime import timedelta\nfrom llama_export.runner import env\n"
            "env.COLLECTIVE_TIMEOUT = timedelta(seconds=2)\n"
            "try:\n    env.init_process_group(env.rank_env(), 'cpu')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "RANK": "1", "WORLD_SIZE": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    out = r.stdout.strip()
    assert out.startswith("PeerLostError joining the process group at 127.0.0.1:%d" % port), (out, r.stderr)
    assert "unset RANK and WORLD_SIZE" in out and "another rank" not in out, out


def test_a_launched_rank_still_blames_its_peers(clean_env, monkeypatch):
    """Under our launcher the join's failure is an echo (the launcher names the rank that did not come)."""
    clean_env.setenv("LLAMA_EXPORT_WORKER", "1")
    monkeypatch.setattr(rank_env_module, "COLLECTIVE_TIMEOUT", timedelta(seconds=1))
    import torch.distributed as dist

    def fail(**kwargs):
        raise RuntimeError("timed out")

    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: fail(**k))
    with pytest.raises(PeerLostError, match="another rank died, stopped or timed out"):
        init_process_group(RankEnv(rank=1, world_size=2, local_rank=1), "cpu")
