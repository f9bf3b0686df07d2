"""Reference decompositions of the custom nodes into plain ONNX ops (opset 23).

These spell out `artifact/schema.py`'s semantics literally; tests run every backend lowering against
them (and both against torch). No backend uses them to run models.

    RMSNorm(x, w)                        RoPE(x, cos, sin), interleaved
      x32 = Cast(x, float)                 x32 = Cast(x, float); r = Reshape(x32, [B, S, H, D/2, 2])
      ms  = ReduceMean(x32 * x32, -1)      a, b = Split(r, -1)            c = cos[None, :, None, :, None]
      y   = Cast(x32 / Sqrt(ms + eps), T)  y = Concat(a*c - b*s, a*s + b*c, -1) → Reshape(Shape(x)) → Cast(T)
      y   = y * w                        rotate-half: a, b = Split(x32, -1); c = cos[None, :, None, :]
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.export.passes.rewrite import Emit, ReplaceCustomNodesPass, attr


def _rms_norm(node: ir.Node, op: Emit) -> ir.Value:
    x, w = node.inputs
    x32 = op("Cast", [x], to=int(ir.DataType.FLOAT))
    ms = op("ReduceMean", [op("Mul", [x32, x32]), op.i64([-1])], keepdims=1)
    eps = op("Constant", [], value=ir.tensor(np.float32(attr(node, "epsilon", 1e-5))))
    norm = op("Div", [x32, op("Sqrt", [op("Add", [ms, eps])])])
    return op("Mul", [op("Cast", [norm], to=int(x.dtype)), w])


def _rope(node: ir.Node, op: Emit) -> ir.Value:
    x, cos, sin = node.inputs
    x32 = op("Cast", [x], to=int(ir.DataType.FLOAT))
    if attr(node, "interleaved", 1):
        a, b = op.multi("Split", [op("Reshape", [x32, op.i64([0, 0, 0, -1, 2])])], 2, axis=-1, num_outputs=2)
        axes = op.i64([0, 2, 4])
    else:
        a, b = op.multi("Split", [x32], 2, axis=-1, num_outputs=2)
        axes = op.i64([0, 2])
    c, s = op("Unsqueeze", [cos, axes]), op("Unsqueeze", [sin, axes])
    y0 = op("Sub", [op("Mul", [a, c]), op("Mul", [b, s])])
    y1 = op("Add", [op("Mul", [a, s]), op("Mul", [b, c])])
    y = op("Reshape", [op("Concat", [y0, y1], axis=-1), op("Shape", [x])])
    return op("Cast", [y], to=int(x.dtype))


class DecomposePass(ReplaceCustomNodesPass):
    """Every RMSNorm / RoPE node replaced by its reference decomposition (in place)."""

    builders = {schema.RMS_NORM: _rms_norm, schema.ROPE: _rope}
