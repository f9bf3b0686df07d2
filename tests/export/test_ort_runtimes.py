"""The ORT backend on every onnxruntime it claims: 1.32 (the pinned CPU build) and onnxruntime-gpu 1.31.1
(its CPU provider; `.ci/run` runs this file again in a second virtualenv that has it).

1.31's GroupQueryAttention has no `query_seqlens` input, so the written lowering (fused, 17 inputs) does
not load there and the backend lowers in memory without the fusion (`backends/ort/runtime.py`). Either
way a ragged batch (prompts of 7, 2 and 5 tokens, then decode) must equal eager: fp32 logits within 1e-4
(llama_export/tolerances.py), identical greedy tokens. A runtime older than 1.31 is one clear line.
"""

from __future__ import annotations

import types

import numpy as np
import onnxruntime as ort
import pytest

from llama_export.artifact.manifest import load_manifest, resolve_inside
from llama_export.backends.ort import OrtBackend, runtime
from llama_export.config import ModelDType, Precision
from llama_export.engine.batch import generate
from llama_export.engine.generate import pad_prompts
from llama_export.errors import BackendUnavailableError
from llama_export.export.exporter import ExportOptions
from llama_export.job import run_job
from llama_export.model.checkpoint import build_model
from llama_export.parallel.comm import ThreadGroup
from llama_export.runner.stitch import empty_cache, segmented_step
from tests.helpers import random_meta_state, tiny_config, write_meta

ROWS = [[5, 17, 3, 99, 42, 7, 8], [11, 2], [60, 61, 62, 63, 64]]
NEW = 4
ATOL = 1e-4
FUSES = runtime.fused_attention(ort)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtimes")
    cfg = tiny_config("gqa")
    ckpt = write_meta(root / "ckpt", cfg, random_meta_state(cfg, seed=5))
    reports = run_job(ExportOptions(checkpoint=ckpt, out=root / "graphs", progress=False), [1, 2],
                      [ModelDType(Precision.FP32)], validate=False)
    return ckpt, {r.variant: r.path for r in reports}


def _eager(ckpt, tp: int):
    prompt, lengths = pad_prompts(ROWS)

    def rank_fn(rank, comm):
        model = build_model(ckpt, tp=tp, rank=rank, comm=comm)
        return generate(model.step, prompt, model.empty_cache(len(ROWS), int(lengths.max()) + NEW),
                        max_new_tokens=NEW, prompt_lengths=lengths)

    return ThreadGroup(tp).run(rank_fn)[0]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant", ["tp1-fp32", "tp2-fp32"])
def test_ragged_generation_equals_eager(setup, variant, fuse, monkeypatch):
    if fuse and not FUSES:
        pytest.skip(f"onnxruntime {ort.__version__}'s GroupQueryAttention has no query_seqlens (1.32+)")
    monkeypatch.setattr(runtime, "fused_attention", lambda _ort: fuse)
    ckpt, paths = setup
    manifest = load_manifest(paths[variant])
    prompt, lengths = pad_prompts(ROWS)

    def rank_fn(rank, comm):
        be = OrtBackend(manifest, paths[variant], rank=rank, threads=1)
        assert be.prelowered == fuse  # the written lowering only where GQA is fused
        cache = empty_cache(manifest, rank, len(ROWS), int(lengths.max()) + NEW, backend=be)
        return generate(segmented_step(manifest, be, comm=comm), prompt, cache, max_new_tokens=NEW,
                        prompt_lengths=lengths)

    got = ThreadGroup(manifest.tp).run(rank_fn)[0]
    want = _eager(ckpt, manifest.tp)
    assert np.array_equal(got.new_tokens, want.new_tokens)
    for g, w in zip(got.steps, want.steps):
        assert np.abs(g.logits - w.logits).max() <= ATOL


def test_written_lowering_opens_exactly_where_gqa_takes_query_seqlens(setup):
    path = setup[1]["tp1-fp32"]
    seg = load_manifest(path).rank(0).segments[0]
    file = str(resolve_inside(path, seg.ort.file))
    if FUSES:
        ort.InferenceSession(file, providers=["CPUExecutionProvider"])
    else:
        with pytest.raises(Exception, match=f"input size {runtime.GQA_INPUTS} not in range"):
            ort.InferenceSession(file, providers=["CPUExecutionProvider"])


def test_the_backend_detects_this_runtime():
    # the schema and the version agree on both runtimes we run (1.31.1 and 1.32.0)
    assert FUSES == (runtime._version(ort.__version__) >= (1, 32))


@pytest.mark.parametrize("version", ["1.30.0", "1.22.1", "0.9"])
def test_a_runtime_older_than_supported_is_one_line(version):
    with pytest.raises(BackendUnavailableError) as e:
        runtime.check_version(types.SimpleNamespace(__version__=version))
    msg = str(e.value)
    assert "\n" not in msg and f"onnxruntime {version} is older than 1.31" in msg
    assert "pip install -U 'onnxruntime>=1.31'" in msg


@pytest.mark.parametrize("version", ["1.31.1", "1.32.0", "1.32.0.dev20261101", "2.0.0"])
def test_supported_runtimes_pass(version):
    runtime.check_version(types.SimpleNamespace(__version__=version))


def test_the_backend_refuses_an_old_runtime(setup, monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.30.2")
    path = setup[1]["tp1-fp32"]
    with pytest.raises(BackendUnavailableError, match=r"onnxruntime 1\.30\.2 is older than 1\.31"):
        OrtBackend(load_manifest(path), path, rank=0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_tensors_bind_by_their_onnx_element_type(dtype):
    """CUDA runs bind torch tensors (`_buffer`); numpy has no bfloat16, so the element type is the ONNX
    one, which IOBinding takes as an int. Shown on the CPU provider with CPU tensors: x -> Cast(fp32)."""
    import torch
    from onnx import TensorProto, helper

    from llama_export import dtypes
    from llama_export.backends.ort import _buffer

    d = dtypes.by_name(dtype)
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("x", d.onnx, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.tensor([[1.5, -2.0, 3.25], [0.5, 8.0, -0.125]], dtype=d.torch)  # exact in every dtype
    y = torch.empty(2, 3, dtype=torch.float32)
    elem, shape, _ = _buffer(x)
    assert elem == d.onnx and shape == [2, 3]
    io = session.io_binding()
    io.bind_input("x", "cpu", 0, *_buffer(x))
    io.bind_output("y", "cpu", 0, *_buffer(y))
    session.run_with_iobinding(io)
    assert torch.equal(y, x.float())
