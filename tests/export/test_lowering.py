"""Custom nodes: ORT's fused kernels (lowering) against the plain-ONNX reference decomposition and the
torch reference, fp32 and fp16, both RoPE layouts.

Tolerances (max abs, inputs ~N(0,1)): fp32 1e-5; fp16 4e-3 (one fp16 ulp at magnitude ~4).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from llama_export.artifact import schema
from llama_export.backends.ort.lowering import OrtLoweringPass
from llama_export.export.reference import DecomposePass
from llama_export.model.ops import rms_norm_reference, rope_reference

TOL = {np.float32: 1e-5, np.float16: 4e-3}
_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _model(node, inputs, outputs):
    schema.register_onnx_schemas()
    g = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(schema.DOMAIN, 1)],
                             ir_version=10)


def _apply(pass_type, proto):
    """A lowered copy of `proto` (the passes rewrite an onnx_ir model in place)."""
    model = ir.from_proto(proto)
    pass_type()(model)
    return ir.to_proto(model)


def lower_for_ort(proto):
    return _apply(OrtLoweringPass, proto)


def decompose(proto):
    return _apply(DecomposePass, proto)


def _run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


@pytest.mark.parametrize("dt", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(2, 3, 64), (1, 1, 96), (3, 5, 128)])
def test_rms_norm_lowering_matches_decomposition_and_torch(dt, shape):
    d = shape[-1]
    t = _ONNX[dt]
    node = helper.make_node("RMSNorm", ["x", "w"], ["y"], domain=schema.DOMAIN, epsilon=1e-5, name="/n")
    m = _model(node, [helper.make_tensor_value_info("x", t, ["b", "s", d]), helper.make_tensor_value_info("w", t, [d])],
               [helper.make_tensor_value_info("y", t, ["b", "s", d])])
    schema.check_model(m)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dt)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(dt)
    fused = _run(lower_for_ort(m), {"x": x, "w": w}).astype(np.float32)
    ref = _run(decompose(m), {"x": x, "w": w}).astype(np.float32)
    torch_ref = rms_norm_reference(torch.from_numpy(x), torch.from_numpy(w), 1e-5).float().numpy()
    assert np.abs(ref - torch_ref).max() <= TOL[dt]
    assert np.abs(fused - ref).max() <= TOL[dt]
    assert {n.op_type for n in lower_for_ort(m).graph.node} == {"RMSNormalization"}


@pytest.mark.parametrize("dt", [np.float32, np.float16])
@pytest.mark.parametrize("interleaved", [1, 0])
@pytest.mark.parametrize("bshd", [(2, 3, 4, 16), (1, 1, 2, 64), (2, 7, 3, 128)])
def test_rope_lowering_matches_decomposition_and_torch(dt, interleaved, bshd):
    b, s, h, d = bshd
    t = _ONNX[dt]
    node = helper.make_node("RoPE", ["x", "cos", "sin"], ["y"], domain=schema.DOMAIN, interleaved=interleaved,
                            name="/r")
    m = _model(node, [helper.make_tensor_value_info("x", t, ["b", "s", h, d]),
                      helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["s", d // 2]),
                      helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["s", d // 2])],
               [helper.make_tensor_value_info("y", t, ["b", "s", h, d])])
    schema.check_model(m)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(bshd).astype(dt)
    ang = (rng.random((s, d // 2)) * 6).astype(np.float32)
    feeds = {"x": x, "cos": np.cos(ang), "sin": np.sin(ang)}
    fused = _run(lower_for_ort(m), feeds).astype(np.float32)
    ref = _run(decompose(m), feeds).astype(np.float32)
    torch_ref = rope_reference(torch.from_numpy(x), torch.from_numpy(feeds["cos"]), torch.from_numpy(feeds["sin"]),
                               bool(interleaved)).float().numpy()
    assert np.abs(ref - torch_ref).max() <= TOL[dt]
    assert np.abs(fused - ref).max() <= TOL[dt]
    assert "RotaryEmbedding" in {n.op_type for n in lower_for_ort(m).graph.node}


def test_layouts_differ():
    """Guards the test above: interleaved and rotate-half give different results on the same input."""
    x = torch.randn(1, 2, 1, 8)
    ang = torch.rand(2, 4) * 3
    a = rope_reference(x, ang.cos(), ang.sin(), True)
    b = rope_reference(x, ang.cos(), ang.sin(), False)
    assert (a - b).abs().max() > 0.1
