"""Reference decompositions of the custom nodes into plain ONNX ops (opset 23).

These spell out `schema.py`'s semantics literally, for tests to compare every lowering against, and
as a last-resort lowering for runtimes with no fused kernel.

    RMSNorm(x, w)                        RoPE(x, cos, sin), interleaved
      x32 = Cast(x, float)                 x32 = Cast(x, float); r = Reshape(x32, [B, S, H, D/2, 2])
      ms  = ReduceMean(x32 * x32, -1)      a, b = Split(r, -1)            c = cos[None, :, None, :, None]
      y   = Cast(x32 / Sqrt(ms + eps), T)  y = Concat(a*c - b*s, a*s + b*c, -1) → Reshape(Shape(x)) → Cast(T)
      y   = y * w                        rotate-half: a, b = Split(x32, -1); c = cos[None, :, None, :]
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from llama_export.export import schema
from llama_export.export.passes.rewrite import attr, const_i64, elem_type, replace_custom_nodes


def decompose(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every RMSNorm / RoPE node replaced by its reference decomposition."""

    def rms_norm(node, fresh):
        x, w = node.input
        t = elem_type(model, x)
        eps = attr(node, "epsilon", 1e-5)
        x32, sq, ms, eps_c, add, root, norm, cast = (fresh(s) for s in
                                                     ("x32", "sq", "ms", "eps", "add", "sqrt", "norm", "cast"))
        axes = fresh("axes")
        return [
            helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT),
            helper.make_node("Mul", [x32, x32], [sq]),
            const_i64([-1], axes),
            helper.make_node("ReduceMean", [sq, axes], [ms], keepdims=1),
            helper.make_node("Constant", [], [eps_c], value=helper.make_tensor(eps_c, TensorProto.FLOAT, [], [eps])),
            helper.make_node("Add", [ms, eps_c], [add]),
            helper.make_node("Sqrt", [add], [root]),
            helper.make_node("Div", [x32, root], [norm]),
            helper.make_node("Cast", [norm], [cast], to=t),
            helper.make_node("Mul", [cast, w], [node.output[0]]),
        ]

    def rope(node, fresh):
        x, cos, sin = node.input
        t = elem_type(model, x)
        interleaved = attr(node, "interleaved", 1)
        x32 = fresh("x32")
        nodes = [helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT)]
        c, s = fresh("cos"), fresh("sin")
        if interleaved:
            shape5, r, a, b, ax = fresh("shape5"), fresh("pairs"), fresh("a"), fresh("b"), fresh("axes")
            nodes += [
                const_i64([0, 0, 0, -1, 2], shape5),
                helper.make_node("Reshape", [x32, shape5], [r]),
                helper.make_node("Split", [r], [a, b], axis=-1, num_outputs=2),
                const_i64([0, 2, 4], ax),
                helper.make_node("Unsqueeze", [cos, ax], [c]),
                helper.make_node("Unsqueeze", [sin, ax], [s]),
            ]
        else:
            a, b, ax = fresh("a"), fresh("b"), fresh("axes")
            nodes += [
                helper.make_node("Split", [x32], [a, b], axis=-1, num_outputs=2),
                const_i64([0, 2], ax),
                helper.make_node("Unsqueeze", [cos, ax], [c]),
                helper.make_node("Unsqueeze", [sin, ax], [s]),
            ]
        ac, bs, as_, bc, y0, y1, y = (fresh(n) for n in ("ac", "bs", "as", "bc", "y0", "y1", "y"))
        nodes += [
            helper.make_node("Mul", [a, c], [ac]),
            helper.make_node("Mul", [b, s], [bs]),
            helper.make_node("Mul", [a, s], [as_]),
            helper.make_node("Mul", [b, c], [bc]),
            helper.make_node("Sub", [ac, bs], [y0]),
            helper.make_node("Add", [as_, bc], [y1]),
            helper.make_node("Concat", [y0, y1], [y], axis=-1),
        ]
        shape, yr = fresh("shape"), fresh("yr")
        nodes += [
            helper.make_node("Shape", [x], [shape]),
            helper.make_node("Reshape", [y, shape], [yr]),
            helper.make_node("Cast", [yr], [node.output[0]], to=t),
        ]
        return nodes

    return replace_custom_nodes(model, {schema.RMS_NORM: rms_norm, schema.ROPE: rope})
