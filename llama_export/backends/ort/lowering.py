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

import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.errors import ArtifactError
from llama_export.export.passes.rewrite import Emit, ReplaceCustomNodesPass, attr


def _rms_norm(node: ir.Node, op: Emit) -> ir.Value:
    return op("RMSNormalization", list(node.inputs), axis=-1, epsilon=attr(node, "epsilon", 1e-5), stash_type=1)


def _rope(node: ir.Node, op: Emit) -> ir.Value:
    x, cos, sin = node.inputs
    if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[2], int):
        raise ArtifactError(f"RoPE input {x.name} has no static head count (axis 2); re-export the graph")
    shape = op("Shape", [x])
    half = op("Slice", [op("Shape", [cos]), op.i64([1]), op.i64([2])])
    table_shape = op("Concat", [op("Slice", [shape, op.i64([0]), op.i64([2])]), half], axis=0)
    x3 = op("Reshape", [op.cast(x, ir.DataType.FLOAT), op.i64([0, 0, -1])])
    y3 = op("RotaryEmbedding", [x3, op("Expand", [cos, table_shape]), op("Expand", [sin, table_shape])],
            num_heads=x.shape[2], interleaved=attr(node, "interleaved", 1))
    return op.cast(op("Reshape", [y3, shape]), x.dtype)


class OrtLoweringPass(ReplaceCustomNodesPass):
    """RMSNorm / RoPE → RMSNormalization / RotaryEmbedding (in place)."""

    builders = {schema.RMS_NORM: _rms_norm, schema.ROPE: _rope}

    def ensures(self, model: ir.Model) -> None:
        left = sorted({n.op_type for n in model.graph if n.domain == schema.DOMAIN})
        if left:
            raise ArtifactError(f"custom nodes {left} cannot run on ONNX Runtime; the graph must be partitioned first")
