"""Lowering for ONNX Runtime: blocked `DequantizeLinear` weights → ONNX Runtime's fused kernels.

    before                                              after
    W_q [K, N] int4|int8 or uint4|uint8, W_scale        B [N, K/B, B·bits/8] uint8, scales [N, K/B],
      [K/B, N], (W_zero [K/B, N] uint4|uint8)             (zero_points [N, ceil(K/B·bits/8)] uint8)
      ─► DequantizeLinear(axis=0) ─► MatMul(x, ·)  ──►    ─► com.microsoft.MatMulNBits(x, B, scales, (zero_points),
                                                              K, N, bits, block_size, accuracy_level)
    E_q [V, D], E_scale [V, D/B], (E_zero)              E_q (int4 and unsigned as is; int8 as uint8 + 128),
      ─► DequantizeLinear(axis=1) ─► Gather        ──►    E_scale, (E_zero) ─► com.microsoft.GatherBlockQuantized

MatMulNBits stores unsigned values; without a zero_points input the zero point is 2**(bits-1) (8 or
128), so the signed symmetric q become q + 2**(bits-1). The asymmetric scheme's unsigned q and zero
points go in as they are. 4-bit values (and 4-bit zero points, each column's padded to whole bytes)
are packed two per byte, the first in the low nibble.

`accuracy_level` picks MatMulNBits' compute type. Level 4 (the default here, and onnxruntime-genai's on
CPU) quantizes each block of the activations to int8 on the fly and accumulates in int32: it is what
makes quantized weights fast on CPU (onnxruntime 1.32, 2 cores, a 768x2048 GEMV: fp32 MatMul 333 us;
int4 at level 1 (fp32 compute) 359 us, at level 4 154 us; int8 at level 1 ~12 ms, at level 4 93 us).
It adds an activation rounding error (relative ~5e-3 per product on random data) on top of the weights'
own, so the lowered graph matches the canonical one within a quantization tolerance; level 1 matches it
to fp32 rounding. Export validation runs level 1 (it checks the artifact), `run`/`eval` the default.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llama_export.export.passes import Pass

MS_DOMAIN = "com.microsoft"
DEFAULT_ACCURACY_LEVEL = 4
EXACT_ACCURACY_LEVEL = 1  # fp32 compute: the canonical graph's arithmetic
_BITS = {ir.DataType.INT8: 8, ir.DataType.INT4: 4, ir.DataType.UINT8: 8, ir.DataType.UINT4: 4}
_SIGNED = (ir.DataType.INT8, ir.DataType.INT4)


def _const(v: ir.Value | None) -> ir.TensorProtocol | None:
    return None if v is None else v.const_value


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.value


class WeightOnlyLoweringPass(Pass, ir.passes.InPlacePass):
    """DequantizeLinear(const int4/int8) feeding only MatMul input B (axis 0) or only Gather data
    (axis 1) → MatMulNBits / GatherBlockQuantized. Other DequantizeLinear nodes stay as they are."""

    def __init__(self, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> None:
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        changed = False
        for dq in list(g):
            if dq.op_type != "DequantizeLinear" or dq.domain != "" or len(dq.inputs) not in (2, 3):
                continue
            q, s = _const(dq.inputs[0]), _const(dq.inputs[1])
            z = _const(dq.inputs[2]) if len(dq.inputs) == 3 else None
            block, axis = _attr(dq, "block_size", 0), _attr(dq, "axis", 1)
            uses = list(dq.outputs[0].uses())
            if q is None or s is None or q.dtype not in _BITS or len(q.shape) != 2 or not block or not uses:
                continue
            if (len(dq.inputs) == 3) != (q.dtype not in _SIGNED) or (z is None) == (len(dq.inputs) == 3):
                continue  # signed with a zero point, or unsigned without one (its zero would be 0, not 2**(bits-1))
            bits = _BITS[q.dtype]
            if axis == 0 and all(n.op_type == "MatMul" and i == 1 for n, i in uses):
                new = self._matmuls(g, dq, [n for n, _ in uses], bits, block)
            elif axis == 1 and all(n.op_type == "Gather" and i == 0 and _attr(n, "axis", 0) == 0 for n, i in uses):
                new = self._gathers(g, dq, [n for n, _ in uses], bits, block)
            else:
                continue
            for old, node in new:
                ir.convenience.replace_nodes_and_values(g, old, [old], [node], old.outputs, node.outputs)
            g.remove(dq, safe=True)
            changed = True
        if changed:
            g.opset_imports.setdefault(MS_DOMAIN, 1)
            for name in [n for n, v in g.initializers.items() if not v.uses() and v not in g.outputs]:
                g.initializers.pop(name)
        return ir.passes.PassResult(model, modified=changed)

    def _matmuls(self, g: ir.Graph, dq: ir.Node, matmuls: list[ir.Node], bits: int, block: int):
        q, s, *z = dq.inputs
        qt, st = q.const_value, s.const_value
        k, n = qt.shape
        offset = 2 ** (bits - 1) if qt.dtype in _SIGNED else 0

        def pack() -> np.ndarray:
            values = qt.numpy().astype(np.int16)  # [K, N]
            u = (values.T + offset).astype(np.uint8).reshape(n, k // block, block)
            return np.ascontiguousarray(_nibbles(u) if bits == 4 else u)

        packed = _initializer(g, f"{q.name}_nbits", pack, ir.DataType.UINT8, (n, k // block, block * bits // 8))
        scales = _initializer(g, f"{s.name}_nbits", lambda: np.ascontiguousarray(st.numpy().T), st.dtype,
                              (n, k // block))
        inputs = [packed, scales]
        if z:
            zt = z[0].const_value
            kb = k // block

            def pack_zeros() -> np.ndarray:
                u = zt.numpy().astype(np.uint8).T  # [N, K/B]
                if bits == 4 and kb % 2:  # each column's zero points fill whole bytes
                    u = np.concatenate([u, np.zeros((n, 1), np.uint8)], axis=1)
                return np.ascontiguousarray(_nibbles(u) if bits == 4 else u)

            inputs.append(_initializer(g, f"{z[0].name}_nbits", pack_zeros, ir.DataType.UINT8,
                                       (n, (kb * bits + 7) // 8)))
        return [(mm, ir.node("MatMulNBits", [mm.inputs[0], *inputs], {
            "K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": self.accuracy_level},
            domain=MS_DOMAIN, name=mm.name)) for mm in matmuls]

    def _gathers(self, g: ir.Graph, dq: ir.Node, gathers: list[ir.Node], bits: int, block: int):
        data, scales, *zero = dq.inputs  # uint4 / uint8 data with zero points of its type go in as they are
        if data.const_value.dtype == ir.DataType.INT8:  # 8-bit data is taken unsigned, zero point 128
            dt = data.const_value
            data = _initializer(g, f"{data.name}_u8", lambda: (dt.numpy().astype(np.int16) + 128).astype(np.uint8),
                                ir.DataType.UINT8, tuple(dt.shape))
        return [(ga, ir.node("GatherBlockQuantized", [data, ga.inputs[1], scales, *zero], {
            "gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
            domain=MS_DOMAIN, name=ga.name)) for ga in gathers]


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[..., 2m] values < 16 -> [..., m] bytes, the even-indexed value in the low nibble."""
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _initializer(g: ir.Graph, name: str, make, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
    """A new initializer whose array `make()` computes when its bytes are first asked for (an
    `ir.LazyTensor`): the session's hand-over at run time or `artifact.segments` at export time, one
    weight at a time."""
    lazy = ir.LazyTensor(lambda: ir.tensor(make()), dtype=dtype, shape=ir.Shape(shape), name=name)
    v = ir.Value(name=name, const_value=lazy, shape=ir.Shape(shape), type=ir.TensorType(dtype))
    g.register_initializer(v)
    return v
