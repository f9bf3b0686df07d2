"""A TensorRT rank's GPU memory before any build: `plan`'s estimate, `build`'s refusal (one line naming
--max-batch / --max-seq-len), the engines' limits, and one device-memory buffer for all of a rank's
execution contexts."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from llama_export.artifact.manifest import Manifest, load_manifest
from llama_export.backends.tensorrt import build, runner
from llama_export.config import ModelConfig, Precision, RopeScaling
from llama_export.errors import ConfigError
from llama_export.export.sizing import check_engine_fits, engine_memory
from tests.helpers import run_cli, tiny_export

GiB = 1 << 30
# Llama-3.1-8B (params.json), the size issue 22 worked through
LLAMA31_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                         norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                         max_seq_len=131072)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, export at tp=2) of the tiny MHA model."""
    return tiny_export(tmp_path_factory.mktemp("mem"), seed=0, tp=2)


@pytest.fixture(scope="module")
def export_tp2(tiny) -> Path:
    return tiny[1]


def test_the_kv_cache_is_what_the_runner_allocates(export_tp2):
    m = load_manifest(export_tp2)
    past = next(s for s in m.rank(0).segments[1].inputs if s.name == "past_key_0")
    batch, capacity = 3, 40
    allocated = torch.zeros((batch, int(past.shape[1]), capacity, int(past.shape[3])),
                            dtype=getattr(torch, past.dtype)).nbytes * 2 * m.model.n_layers  # keys + values
    weights = build.rank_weight_bytes(m, export_tp2, 0)
    prefill, decode = engine_memory(m.model, tp=m.tp, dtype=m.dtype, weight_bytes=weights, max_batch=batch,
                                    capacity=capacity)
    assert prefill.kv_cache == decode.kv_cache == allocated
    assert prefill.weights == weights > 0
    assert prefill.activations >= batch * capacity * capacity  # the boolean mask [B, 1, S, C]
    assert decode.activations < prefill.activations and decode.seq == 1 and prefill.seq == capacity


def test_llama31_8b_at_its_full_context_needs_what_the_issue_computed():
    prefill, decode = engine_memory(LLAMA31_8B, tp=1, dtype=Precision.FP16, weight_bytes=15 * GiB, max_batch=8,
                                    capacity=131072)
    assert prefill.kv_cache == 8 * 16 * GiB  # fp16 K+V: 32 layers x 8 KV heads x 128 x 2 B x 2 = 128 KiB/token
    assert prefill.activations > 128 * GiB  # the [8, 1, 131072, 131072] mask alone
    assert decode.total < prefill.total


def test_a_profile_that_cannot_fit_is_one_line_with_values_that_fit():
    limit = 80 * GiB
    with pytest.raises(ConfigError) as e:
        check_engine_fits(LLAMA31_8B, tp=1, dtype=Precision.FP16, weight_bytes=15 * GiB, max_batch=8,
                          capacity=131072, limit=limit, limit_name="--gpu-memory")
    line = str(e.value)
    assert "\n" not in line and "--max-batch" in line and "--max-seq-len" in line and "--gpu-memory" in line
    suggested = int(line.split("--max-seq-len ")[1].split()[0])
    fits = engine_memory(LLAMA31_8B, tp=1, dtype=Precision.FP16, weight_bytes=15 * GiB, max_batch=8,
                         capacity=suggested)
    more = engine_memory(LLAMA31_8B, tp=1, dtype=Precision.FP16, weight_bytes=15 * GiB, max_batch=8,
                         capacity=suggested + 256)
    assert max(m.total for m in fits) <= limit < max(m.total for m in more)
    check_engine_fits(LLAMA31_8B, tp=1, dtype=Precision.FP16, weight_bytes=15 * GiB, max_batch=8,
                      capacity=suggested, limit=limit, limit_name="--gpu-memory")  # and build takes it


def test_plan_prints_a_tensorrt_rank_per_profile(tiny):
    ckpt = tiny[0]
    r = run_cli("plan", "--checkpoint", str(ckpt), "--tp", "2", "--max-batch", "3", "--no-progress", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    prefill = next(line for line in lines if line.strip().startswith("prefill (batch 3,"))
    decode = next(line for line in lines if line.strip().startswith("decode (batch 3, 1 tokens"))
    assert "weights" in prefill and "KV cache" in prefill and "activations" in decode


def test_build_refuses_what_cannot_fit_before_needing_tensorrt(export_tp2, tmp_path):
    r = run_cli("build", "--artifacts", str(export_tp2), "--out", str(tmp_path / "e"), "--gpu-memory", "1MiB",
                timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--max-batch" in r.stderr and "--max-seq-len" in r.stderr, r.stderr
    assert "--gpu-memory is 1.00 MiB" in r.stderr and not (tmp_path / "e").exists()
    suggested = int(r.stderr.split("--max-seq-len ")[1].split()[0])
    if importlib.util.find_spec("tensorrt") is not None:
        return  # a machine with TensorRT would build: the rest checks the order of the checks without it
    r = run_cli("build", "--artifacts", str(export_tp2), "--out", str(tmp_path / "e"), "--gpu-memory", "1MiB",
                "--max-seq-len", str(suggested), timeout=120)  # passes the check, then needs TensorRT
    assert r.returncode == 2 and r.stderr.startswith("error: TensorRT is not available"), r.stderr


def test_the_engines_limits(export_tp2):
    m = load_manifest(export_tp2)
    opts = build.BuildOptions(max_batch=1, max_seq_len=16)
    assert build.engine_limits(m, opts) == (1, 16)
    assert build.engine_limits(m, build.BuildOptions()) == (m.max_batch, m.model.max_seq_len)
    with pytest.raises(ConfigError, match="--max-seq-len 999 is longer than the model's max_seq_len"):
        build.engine_limits(m, build.BuildOptions(max_seq_len=999))
    with pytest.raises(ConfigError, match="--max-batch"):
        build.engine_limits(m, build.BuildOptions(max_batch=m.max_batch + 1))
    beside = build.engines_manifest(m, 1, 16)  # what a run of the engines reads: their capacity
    again = Manifest.from_json(beside.to_json(), source="test")
    assert again.model.max_seq_len == 16 and again.max_batch == 1
    assert dataclasses.replace(again.model, max_seq_len=m.model.max_seq_len) == m.model


class _Context:
    def __init__(self, strategy):
        self.strategy, self.memory = strategy, None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, profile, stream):
        return True


class _Engine:
    num_optimization_profiles = 2

    def __init__(self, sizes):
        self.sizes = sizes

    def get_device_memory_size_for_profile_v2(self, p):
        return self.sizes[p]

    def create_execution_context(self, strategy):
        return _Context(strategy)


def test_every_context_of_a_rank_runs_on_one_shared_buffer(monkeypatch):
    strategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    monkeypatch.setattr(runner, "import_tensorrt",
                        lambda: types.SimpleNamespace(ExecutionContextAllocationStrategy=strategy))
    segs = []
    for sizes in ((100, 10), (300, 20)):
        s = object.__new__(runner._Segment)
        s.engine, s.contexts = _Engine(sizes), {}
        segs.append(s)
    assert [s.device_memory_size() for s in segs] == [100, 300]
    scratch = torch.empty(max(s.device_memory_size() for s in segs), dtype=torch.uint8)
    stream = types.SimpleNamespace(cuda_stream=0)
    contexts = [s.context(p, stream, scratch) for s in segs for p in (0, 1)]
    assert all(c.strategy == "user-managed" for c in contexts)
    assert {c.memory for c in contexts} == {(scratch.data_ptr(), 300)}
