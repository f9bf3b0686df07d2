"""The partition pass on a small hand-built graph, executed segment by segment against the whole."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama_export.artifact import schema
from llama_export.export.passes.partition import partition


def _graph(with_markers: bool):
    """x ─► MatMul(W1) ─► [AllReduce] ─► Add(x) ─► Relu ─► [AllGather] ─► Mul(2) ─► y   (+ Shape(x) side chain)"""
    schema.register_onnx_schemas()
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W1")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm")]
    h = "h"
    if with_markers:
        nodes.append(helper.make_node("AllReduce", ["h"], ["h_sum"], domain=schema.DOMAIN, world_size=2, name="ar"))
        h = "h_sum"
    nodes += [helper.make_node("Add", [h, "x"], ["r"], name="add"), helper.make_node("Relu", ["r"], ["a"], name="relu")]
    a = "a"
    if with_markers:
        nodes.append(helper.make_node("AllGather", ["a"], ["a_all"], domain=schema.DOMAIN, axis=1, world_size=2,
                                      name="ag"))
        a = "a_all"
    nodes += [helper.make_node("Mul", [a, "two"], ["y"], name="mul"), helper.make_node("Shape", ["x"], ["xs"], name="shape")]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 4]) for n in ("h", "h_sum", "r", "a")]
    vi.append(helper.make_tensor_value_info("a_all", TensorProto.FLOAT, ["b", 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n"]),
                           helper.make_tensor_value_info("xs", TensorProto.INT64, [2])],
                          [w1, two], value_info=vi)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(schema.DOMAIN, schema.VERSION)],
                             ir_version=10)


def test_no_markers_is_one_segment():
    cuts = partition(ir.from_proto(_graph(False)))
    assert len(cuts) == 1 and cuts[0].collective is None
    assert cuts[0].inputs == ("x",) and set(cuts[0].outputs) == {"y", "xs"}


def test_cut_at_markers_and_stitch():
    cuts = partition(ir.from_proto(_graph(True)))
    assert [c.collective["op"] if c.collective else None for c in cuts] == ["AllReduce", "AllGather", None]
    assert cuts[0].outputs[0] == "h" and cuts[0].collective["output"] == "h_sum"
    # x is needed again after the AllReduce: it is a graph input, fed to segment 1 directly.
    assert set(cuts[1].inputs) == {"h_sum", "x"} and cuts[1].outputs == ("a",)
    assert cuts[1].collective["axis"] == 1
    assert cuts[2].inputs == ("a_all",) and cuts[2].outputs == ("y",)
    # The marker-free side chain is a graph output of segment 0.
    assert "xs" in cuts[0].outputs
    for c in cuts:
        schema.check_model(ir.to_proto(c.model))
        assert not any(n.domain == schema.DOMAIN for n in c.model.graph)

    # Two "ranks" with different inputs, collectives done by hand, against the unpartitioned math.
    xs = [np.random.default_rng(r).standard_normal((3, 4)).astype(np.float32) for r in range(2)]
    sess = [ort.InferenceSession(ir.to_proto(c.model).SerializeToString(), providers=["CPUExecutionProvider"])
            for c in cuts]
    envs = [{"x": x} for x in xs]
    for c, s in zip(cuts, sess):
        for env in envs:
            env.update(zip(c.outputs, s.run(list(c.outputs), {n: env[n] for n in c.inputs})))
        if c.collective:
            parts = [env[c.collective["input"]] for env in envs]
            out = sum(parts) if c.collective["op"] == "AllReduce" else np.concatenate(parts, axis=c.collective["axis"])
            for env in envs:
                env[c.collective["output"]] = out
    w1 = numpy_helper.to_array(_graph(False).graph.initializer[0])
    h_sum = xs[0] @ w1 + xs[1] @ w1
    a = [np.maximum(h_sum + x, 0) for x in xs]
    want = 2 * np.concatenate(a, axis=1)
    for env in envs:
        np.testing.assert_allclose(env["y"], want, rtol=1e-5, atol=1e-5)


def test_collectives_off_the_chain_are_rejected():
    m = _graph(True)
    # Make the AllGather read x directly: it no longer depends on the AllReduce.
    for n in m.graph.node:
        if n.op_type == "AllGather":
            n.input[0] = "x"
    with pytest.raises(ValueError, match="not on the single chain"):
        partition(ir.from_proto(m))
