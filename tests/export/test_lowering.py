"""Custom nodes: ORT's fused kernels (lowering) against the plain-ONNX reference decomposition and the
torch reference, fp32 and fp16, both RoPE layouts; the attention block (GroupQueryAttention) on ragged
batches with a cache already holding tokens.

Tolerances (max abs, inputs ~N(0,1)): fp32 1e-5; fp16 4e-3 (one fp16 ulp at magnitude ~4); the fused
attention in fp16 1e-2 (GQA rotates in fp16 with fp16 tables; the contract rotates in fp32).
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
from llama_export.backends.ort.runtime import fused_attention
from llama_export.export.reference import DecomposePass
from llama_export.model.ops import attention_functional, rms_norm_reference, rope_reference

TOL = {np.float32: 1e-5, np.float16: 4e-3}
_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _model(node, inputs, outputs):
    schema.register_onnx_schemas()
    g = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(schema.DOMAIN, schema.VERSION)],
                             ir_version=10)


def _apply(pass_type, proto):
    """A lowered copy of `proto` (the passes rewrite an onnx_ir model in place)."""
    model = ir.from_proto(proto)
    pass_type()(model)
    return ir.to_proto(model)


# The lowering the ORT backend uses on the installed runtime: GQA fused on onnxruntime >= 1.32, the
# reference decomposition on 1.31 (CI runs this file under onnxruntime-gpu 1.31.1 as well).
FUSES = fused_attention(ort)


def lower_for_ort(proto):
    return _apply(lambda: OrtLoweringPass(fuse_attention=FUSES), proto)


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
def test_residual_add_and_rms_norm_fuse_into_skip_norm(dt):
    """h = a + b; y = RMSNorm(h); z = h + y (the next residual reads h): one SkipSimplifiedLayerNormalization
    whose sum output feeds z, equal to the decomposition and to torch."""
    t, d = _ONNX[dt], 64
    nodes = [helper.make_node("Add", ["a", "b"], ["h"], name="/add"),
             helper.make_node("RMSNorm", ["h", "w"], ["y"], domain=schema.DOMAIN, epsilon=1e-5, name="/n"),
             helper.make_node("Add", ["h", "y"], ["z"], name="/next")]
    io = [helper.make_tensor_value_info(n, t, ["b", "s", d]) for n in ("a", "b")]
    g = helper.make_graph(nodes, "g", [*io, helper.make_tensor_value_info("w", t, [d])],
                          [helper.make_tensor_value_info(n, t, ["b", "s", d]) for n in ("y", "z")],
                          value_info=[helper.make_tensor_value_info("h", t, ["b", "s", d])])  # as exports type it
    schema.register_onnx_schemas()
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(schema.DOMAIN, schema.VERSION)],
                          ir_version=10)
    lowered = lower_for_ort(m)
    assert [n.op_type for n in lowered.graph.node] == ["SkipSimplifiedLayerNormalization", "Add"]
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((2, 3, d)).astype(dt), "b": rng.standard_normal((2, 3, d)).astype(dt),
             "w": (1 + 0.1 * rng.standard_normal(d)).astype(dt)}

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [o.astype(np.float32) for o in s.run(["y", "z"], feeds)]

    h = torch.from_numpy(feeds["a"]) + torch.from_numpy(feeds["b"])
    y_ref = rms_norm_reference(h, torch.from_numpy(feeds["w"]), 1e-5)
    torch_ref = [y_ref.float().numpy(), (h + y_ref).float().numpy()]
    tol = 2 * TOL[dt]  # z adds a second rounding of values up to ~8
    for got, ref, want in zip(run(lowered), run(decompose(m)), torch_ref):
        assert np.abs(got - ref).max() <= tol and np.abs(ref - want).max() <= tol


@pytest.mark.parametrize("dt", [np.float32, np.float16])
@pytest.mark.parametrize("interleaved", [1, 0])
@pytest.mark.parametrize("bshd", [(2, 3, 4, 16), (1, 1, 2, 64), (2, 7, 3, 128)])
def test_rope_lowering_matches_decomposition_and_torch(dt, interleaved, bshd):
    b, s, h, d = bshd
    t = _ONNX[dt]
    node = helper.make_node("RoPE", ["x", "cos", "sin", "start"], ["y"], domain=schema.DOMAIN,
                            interleaved=interleaved, name="/r")
    m = _model(node, [helper.make_tensor_value_info("x", t, ["b", "s", h, d]),
                      helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["p", d // 2]),
                      helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["p", d // 2]),
                      helper.make_tensor_value_info("start", TensorProto.INT64, ["b"])],
               [helper.make_tensor_value_info("y", t, ["b", "s", h, d])])
    schema.check_model(m)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(bshd).astype(dt)
    ang = (rng.random((20, d // 2)) * 6).astype(np.float32)  # 20 table rows; rows start[b] + i are used
    start = np.array([5, 0][:b], dtype=np.int64)
    feeds = {"x": x, "cos": np.cos(ang), "sin": np.sin(ang), "start": start}
    fused = _run(lower_for_ort(m), feeds).astype(np.float32)
    ref = _run(decompose(m), feeds).astype(np.float32)
    torch_ref = rope_reference(torch.from_numpy(x), torch.from_numpy(feeds["cos"]), torch.from_numpy(feeds["sin"]),
                               torch.from_numpy(start), bool(interleaved)).float().numpy()
    assert np.abs(ref - torch_ref).max() <= TOL[dt]
    assert np.abs(fused - ref).max() <= TOL[dt]
    assert "RotaryEmbedding" in {n.op_type for n in lower_for_ort(m).graph.node}


def _attention_block(t, heads: int, kv_heads: int, d: int, *, fusable: bool):
    """qkv [b, s, (H + 2 KVH) d] -> Reshape -> Split -> RoPE q, RoPE k -> Attention, as export writes it
    (with `fusable=False` the RoPE nodes read another start, so the block must not fuse)."""
    n = heads + 2 * kv_heads
    start_rope = "start" if fusable else "start_other"
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("v", TensorProto.INT64, [4], [0, 0, n, d])),
        helper.make_node("Reshape", ["qkv", "shape"], ["qkv4"]),
        helper.make_node("Constant", [], ["sizes"], value=helper.make_tensor("v", TensorProto.INT64, [3],
                                                                              [heads, kv_heads, kv_heads])),
        helper.make_node("Split", ["qkv4", "sizes"], ["q", "k", "v"], axis=2),
        helper.make_node("RoPE", ["q", "cos", "sin", start_rope], ["qr"], domain=schema.DOMAIN, interleaved=1, name="/rq"),
        helper.make_node("RoPE", ["k", "cos", "sin", start_rope], ["kr"], domain=schema.DOMAIN, interleaved=1, name="/rk"),
        helper.make_node("Attention", ["qr", "kr", "v", "past_key", "past_value", "start", "lengths"],
                         ["y", "present_key", "present_value"], domain=schema.DOMAIN, name="/att"),
    ]
    cache = ["b", kv_heads, "c", d]
    ins = [helper.make_tensor_value_info("qkv", t, ["b", "s", n * d]),
           helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["p", d // 2]),
           helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["p", d // 2]),
           helper.make_tensor_value_info("past_key", t, cache), helper.make_tensor_value_info("past_value", t, cache),
           helper.make_tensor_value_info("start", TensorProto.INT64, ["b"]),
           helper.make_tensor_value_info("lengths", TensorProto.INT64, ["b"])]
    if not fusable:
        ins.append(helper.make_tensor_value_info("start_other", TensorProto.INT64, ["b"]))
    outs = [helper.make_tensor_value_info("y", t, ["b", "s", heads * d]),
            helper.make_tensor_value_info("present_key", t, cache),
            helper.make_tensor_value_info("present_value", t, cache)]
    # value_info gives the Split outputs their static head counts, as the exporter's shape inference does
    infos = [helper.make_tensor_value_info(name, t, ["b", "s", h, d])
             for name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads), ("qr", heads), ("kr", kv_heads))]
    g = helper.make_graph(nodes, "g", ins, outs, value_info=infos)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(schema.DOMAIN, schema.VERSION)],
                             ir_version=10)


@pytest.mark.parametrize("dt", [np.float32, np.float16])
@pytest.mark.parametrize("fusable", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_attention_block_lowering_matches_decomposition_and_torch(dt, fusable, heads, kv_heads):
    """A ragged batch over a cache that already holds tokens: row b has start[b] cached tokens and
    lengths[b] new ones (right padding). Only what the contract specifies is compared: y rows
    i < lengths[b] and cache slots < start[b] + lengths[b]."""
    d, b, s, c = 16, 3, 4, 12
    t = _ONNX[dt]
    m = _attention_block(t, heads, kv_heads, d, fusable=fusable)
    schema.check_model(m)
    rng = np.random.default_rng(2)
    start, lengths = np.array([0, 3, 6]), np.array([4, 1, 2])
    pk = np.zeros((b, kv_heads, c, d), dt)
    pv = np.zeros((b, kv_heads, c, d), dt)
    for r in range(b):  # rows' cached tokens (slots past them hold garbage, which must not matter)
        pk[r, :, :] = rng.standard_normal((kv_heads, c, d))
        pv[r, :, :] = rng.standard_normal((kv_heads, c, d))
    ang = (np.arange(32)[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))).astype(np.float32)
    feeds = {"qkv": rng.standard_normal((b, s, (heads + 2 * kv_heads) * d)).astype(dt), "cos": np.cos(ang),
             "sin": np.sin(ang), "past_key": pk, "past_value": pv, "start": start, "lengths": lengths}
    if not fusable:
        feeds["start_other"] = start
    lowered = lower_for_ort(m)
    ops = {n.op_type for n in lowered.graph.node}
    assert ("GroupQueryAttention" in ops) == (fusable and FUSES) and not any(n.domain == schema.DOMAIN for n in lowered.graph.node)
    s_ = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    fused = s_.run(None, feeds)
    ref = ort.InferenceSession(decompose(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    q, k, v = torch.from_numpy(feeds["qkv"]).view(b, s, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], 2)
    st, ln = torch.from_numpy(start), torch.from_numpy(lengths)
    cos, sin = torch.from_numpy(feeds["cos"]), torch.from_numpy(feeds["sin"])
    want = attention_functional(rope_reference(q, cos, sin, st, True), rope_reference(k, cos, sin, st, True), v,
                                torch.from_numpy(pk), torch.from_numpy(pv), st, ln)
    tol = 1e-2 if (dt is np.float16 and fusable and FUSES) else TOL[dt] * 4
    for r in range(b):
        valid, filled = int(lengths[r]), int(start[r] + lengths[r])
        for got in (fused, ref):
            assert np.abs(got[0][r, :valid].astype(np.float32) - want[0][r, :valid].float().numpy()).max() <= tol
            for i in (1, 2):
                assert np.abs(got[i][r, :, :filled].astype(np.float32) - want[i][r, :, :filled].float().numpy()).max() <= tol


def test_layouts_differ():
    """Guards the test above: interleaved and rotate-half give different results on the same input."""
    x = torch.randn(1, 2, 1, 8)
    ang = torch.rand(2, 4) * 3
    a = rope_reference(x, ang.cos(), ang.sin(), torch.zeros(1, dtype=torch.int64), True)
    b = rope_reference(x, ang.cos(), ang.sin(), torch.zeros(1, dtype=torch.int64), False)
    assert (a - b).abs().max() > 0.1
