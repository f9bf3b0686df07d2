"""Tiny hand-built segment graphs (no export needed) for the TensorRT lowering and build tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama_export.artifact import schema


def attention_like_segment(layer: int, *, seed: int, d: int = 8, heads: int = 2, fn: bool = True,
                           positions: int = 16) -> onnx.ModelProto:
    """x[batch, seq, d] -> RMSNorm -> MatMul(wq) -> Reshape -> RoPE(cos, sin [positions, d/heads/2], start)
    -> y[batch, seq, heads, d/heads].

    Initializer values depend on `seed`; the structure depends only on the sizes. With `fn`, an ONNX
    function named RMSNorm is attached (as an exporter might), which the lowering must remove.
    """
    rng = np.random.default_rng(seed)
    p = f"/model/layers.{layer}"
    inits = [
        numpy_helper.from_array(rng.standard_normal(d).astype(np.float16), f"{p}/norm.weight"),
        numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float16), f"{p}/wq.weight"),
        numpy_helper.from_array(np.array([0, 0, heads, d // heads], np.int64), f"{p}/shape"),
    ]
    nodes = [
        helper.make_node("RMSNorm", ["x", f"{p}/norm.weight"], ["h"], name=f"{p}/norm/RMSNorm",
                         domain=schema.DOMAIN, epsilon=1e-5),
        helper.make_node("MatMul", ["h", f"{p}/wq.weight"], ["q"], name=f"{p}/wq/MatMul"),
        helper.make_node("Reshape", ["q", f"{p}/shape"], ["q4"], name=f"{p}/Reshape"),
        helper.make_node("RoPE", ["q4", "cos", "sin", "start"], ["y"], name=f"{p}/rope/RoPE",
                         domain=schema.DOMAIN, interleaved=1),
    ]
    graph = helper.make_graph(
        nodes, f"layer{layer}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", d]),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [positions, d // heads // 2]),
         helper.make_tensor_value_info("sin", TensorProto.FLOAT, [positions, d // heads // 2]),
         helper.make_tensor_value_info("start", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", heads, d // heads])],
        inits,
        value_info=[helper.make_tensor_value_info("q4", TensorProto.FLOAT16, ["batch", "seq", heads, d // heads])],
    )
    functions = []
    if fn:
        functions.append(helper.make_function(
            schema.DOMAIN, schema.RMS_NORM, ["x", "w"], ["y"],
            [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 21)],
        ))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(schema.DOMAIN, schema.VERSION)],
        functions=functions, ir_version=10,
    )
