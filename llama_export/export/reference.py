"""Reference decompositions of the custom nodes into plain ONNX ops (opset 24).

These spell out `artifact/schema.py`'s semantics literally; tests run every backend lowering against
them (and all against torch). ONNX Runtime runs the Attention decomposition where its fused kernel
does not apply, and the TensorRT lowering uses it (TensorScatter and Attention are TensorRT's
KV-cache-update and attention layers).

    RMSNorm(x, w)                        RoPE(x, cos, sin, start), interleaved
      x32 = Cast(x, float)                 pos = start[:, None] + Range(S)        [B, S]
      ms  = ReduceMean(x32 * x32, -1)      c = Gather(cos, pos)[:, :, None, :, None]   (s alike)
      y   = Cast(x32 / Sqrt(ms + eps), T)  x32 = Cast(x, float); a, b = Split(Reshape(x32, [B, S, H, D/2, 2]))
      y   = y * w                          y = Concat(a*c - b*s, a*s + b*c, -1) → Reshape(Shape(x)) → Cast(T)
                                           rotate-half: a, b = Split(x32, -1); c = Gather(cos, pos)[:, :, None, :]

    Attention(q, k, v, past_key, past_value, start, lengths)
      present_key = TensorScatter(past_key, Transpose(k, [0, 2, 1, 3]), write_indices=start, axis=-2)  (v alike)
      mask [B, 1, S, C] = Range(C)[None, None, None, :] <= pos[:, None, :, None]       (pos as above)
      y = Reshape(Transpose(Attention(Transpose(q), present_key, present_value, mask,
                                      softmax_precision=float), [0, 2, 1, 3]), [0, 0, -1])

`rope_as_rotary_embedding` is RoPE as the standard opset-23 `RotaryEmbedding` with position ids (in fp32),
the form ONNX Runtime runs where its fused attention does not apply and TensorRT maps to its rotary layer.

TensorScatter also writes the padding rows of a right-padded row (slots past start + lengths, which the
contract leaves unspecified); `start + S <= C` keeps them inside the cache.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.artifact import schema
from llama_export.errors import ArtifactError
from llama_export.export.passes.rewrite import Emit, ReplaceCustomNodesPass, attr

ATTENTION_OPSET = 24  # TensorScatter and Attention's nonpad_kv_seqlen arrived in opset 24


def _rms_norm(node: ir.Node, op: Emit) -> ir.Value:
    x, w = node.inputs
    x32 = op("Cast", [x], to=int(ir.DataType.FLOAT))
    ms = op("ReduceMean", [op("Mul", [x32, x32]), op.i64([-1])], keepdims=1)
    eps = op("Constant", [], value=ir.tensor(np.float32(attr(node, "epsilon", 1e-5))))
    norm = op("Div", [x32, op("Sqrt", [op("Add", [ms, eps])])])
    return op("Mul", [op("Cast", [norm], to=int(x.dtype)), w])


def _rope(node: ir.Node, op: Emit) -> ir.Value:
    x, cos, sin, start = node.inputs
    x32 = op("Cast", [x], to=int(ir.DataType.FLOAT))
    pos = op.positions(x, start)
    c, s = op("Gather", [cos, pos], axis=0), op("Gather", [sin, pos], axis=0)  # [B, S, D/2]
    if attr(node, "interleaved", 1):
        a, b = op.multi("Split", [op("Reshape", [x32, op.i64([0, 0, 0, -1, 2])])], 2, axis=-1, num_outputs=2)
        axes = op.i64([2, 4])
    else:
        a, b = op.multi("Split", [x32], 2, axis=-1, num_outputs=2)
        axes = op.i64([2])
    c, s = op("Unsqueeze", [c, axes]), op("Unsqueeze", [s, axes])
    y0 = op("Sub", [op("Mul", [a, c]), op("Mul", [b, s])])
    y1 = op("Add", [op("Mul", [a, s]), op("Mul", [b, c])])
    y = op("Reshape", [op("Concat", [y0, y1], axis=-1), op("Shape", [x])])
    return op("Cast", [y], to=int(x.dtype))


def rope_as_rotary_embedding(node: ir.Node, op: Emit) -> ir.Value:
    """RoPE(x [B,S,H,D], cos, sin, start) as Cast(Reshape(RotaryEmbedding(Reshape(Cast(x, fp32), [B, S, H*D]),
    cos, sin, position_ids = start[:, None] + Range(S), num_heads=H, interleaved), Shape(x)), T)."""
    x, cos, sin, start = node.inputs
    if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[2], int):
        raise ArtifactError(f"RoPE input {x.name} has no static head count (axis 2); re-export the graph")
    x3 = op("Reshape", [op.cast(x, ir.DataType.FLOAT), op.i64([0, 0, -1])])
    y3 = op("RotaryEmbedding", [x3, cos, sin, op.positions(x, start)], num_heads=x.shape[2],
            interleaved=attr(node, "interleaved", 1))
    return op.cast(op("Reshape", [y3, op("Shape", [x])]), x.dtype)


def attention(node: ir.Node, op: Emit, *, fp32_softmax: bool = True) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The Attention node as TensorScatter + opset-24 Attention (see the module docstring).

    `fp32_softmax=False` leaves out `softmax_precision` (the softmax then runs at the runtime's own
    precision): TensorRT's ONNX parser rejects a node that sets it (`backends/tensorrt/lowering.py`)."""
    q, k, v, past_key, past_value, start, _lengths = node.inputs
    bnsh = [0, 2, 1, 3]
    # axis -2 (the sequence axis of [B, KVH, C, D]) spelled as onnx-tensorrt's operators.md requires it:
    # "`axis` must be -2"
    present_key = op("TensorScatter", [past_key, op("Transpose", [k], perm=bnsh), start], axis=-2)
    present_value = op("TensorScatter", [past_value, op("Transpose", [v], perm=bnsh), start], axis=-2)
    pos = op.positions(q, start)  # [B, S]
    slots = op("Range", [op.scalar(0), op.dim(past_key, 2), op.scalar(1)])  # [C]
    mask = op("LessOrEqual", [op("Unsqueeze", [slots, op.i64([0, 1, 2])]), op("Unsqueeze", [pos, op.i64([1, 3])])])
    precision = {"softmax_precision": int(ir.DataType.FLOAT)} if fp32_softmax else {}
    y = op("Attention", [op("Transpose", [q], perm=bnsh), present_key, present_value, mask], **precision)
    return op("Reshape", [op("Transpose", [y], perm=bnsh), op.i64([0, 0, -1])]), present_key, present_value


class DecomposePass(ReplaceCustomNodesPass):
    """Every RMSNorm / RoPE / Attention node replaced by its reference decomposition (in place)."""

    builders = {schema.RMS_NORM: _rms_norm, schema.ROPE: _rope, schema.ATTENTION: attention}
    extra_opsets = {"": ATTENTION_OPSET}
