"""Pass: weight-only quantization of a segment whose weights are attached.

    before                                          after
    W [K, N] fp ─► MatMul(x, W)             ──►     W_q [K, N] int4|int8 (uint4|uint8 asymmetric) ─┐
                                                    W_scale [K/B, N] fp                            ─┤
                                                    W_zero [K/B, N] uint4|uint8 (asymmetric only)  ─► DequantizeLinear(
                                                                           axis=0, block_size=B) ─► MatMul(x, ·)
    E [V, D] fp ─► Gather(E, tokens)        ──►     E_q [V, D], E_scale [V, D/B], (E_zero) ─► DequantizeLinear(axis=1,
       (only with WeightQuant.embedding)                                                     block_size=B) ─► Gather

Standard ONNX (opset 21+ blocked `DequantizeLinear`, INT4/INT8 initializers), which TensorRT's
weight-only GEMMs consume as is; the ONNX Runtime lowering rewrites the pairs into its fused kernels
(`backends/ort/weight_only.py`). The pass works on whatever `MatMul(x, W)` with a 2-D float initializer
`W` a segment has (after `AttachWeightsPass`, W is the transposed parameter `<param>_t`), so it does
not depend on how projections are packed. It runs per rank on the rank's slices, so no block straddles
ranks. It rewrites the graph at once but quantizes lazily: the int and scale tensors are computed when
`artifact.segments.write_segment` reads them, one weight at a time, and the float values are dropped right after. The numbers come
from `model.quantize`, which the eager reference uses too.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from llama_export.config import WeightQuant
from llama_export.errors import ArtifactError
from llama_export.export.passes import Pass
from llama_export.model.quantize import check_blocks, quantize_blocks

# (bits, symmetric) -> the stored type: signed when symmetric (zero point 0), unsigned with zero points
_INT = {(8, True): (ir.DataType.INT8, np.int8), (4, True): (ir.DataType.INT4, ml_dtypes.int4),
        (8, False): (ir.DataType.UINT8, np.uint8), (4, False): (ir.DataType.UINT4, ml_dtypes.uint4)}


def param_name(initializer: str) -> str:
    """The checkpoint parameter behind a weight initializer (`<param>_t` when stored transposed)."""
    return initializer[:-2] if initializer.endswith("_t") else initializer


def _block_axis(value: ir.Value) -> int | None:
    """0 when every use is `MatMul` input B, 1 when every use is `Gather` data; else None."""
    uses = list(value.uses())
    if uses and all(n.op_type == "MatMul" and n.domain == "" and i == 1 for n, i in uses):
        return 0
    if uses and all(n.op_type == "Gather" and n.domain == "" and i == 0 for n, i in uses):
        return 1
    return None


def _as_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    array = tensor.numpy()
    if tensor.dtype == ir.DataType.BFLOAT16:  # numpy has no bfloat16: its bits, viewed as torch's
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _lazy_quantized(tensor: ir.TensorProtocol, axis: int, scheme: WeightQuant, q_shape: ir.Shape,
                    s_shape: ir.Shape) -> list[ir.LazyTensor]:
    """[quantized, scale] (and zero point when asymmetric) of `tensor`, computed when the first is read;
    the others are kept until read (the writer takes them in turn, so one tensor's set at most is held)."""
    qtype, np_type = _INT[scheme.bits, scheme.symmetric]
    kept: dict[str, ir.TensorProtocol] = {}

    def compute() -> None:
        w = _as_torch(tensor)
        w = w.t() if axis == 0 else w  # rows = output channels, blocks along the input features
        q, scale, zero = quantize_blocks(w, **scheme.quantizer, scale_dtype=w.dtype)
        if axis == 0:
            q, scale, zero = q.t(), scale.t(), None if zero is None else zero.t()
        kept["q"] = ir.Tensor(q.contiguous().numpy().astype(np_type), dtype=qtype)
        kept["scale"] = ir.tensor_adapters.TorchTensor(scale.contiguous())
        if zero is not None:
            kept["zero"] = ir.Tensor(zero.contiguous().numpy().astype(np_type), dtype=qtype)

    def take(key: str) -> ir.TensorProtocol:
        if key not in kept:
            compute()
        return kept.pop(key)

    out = [ir.LazyTensor(lambda: take("q"), dtype=qtype, shape=q_shape),
           ir.LazyTensor(lambda: take("scale"), dtype=tensor.dtype, shape=s_shape)]
    if not scheme.symmetric:
        out.append(ir.LazyTensor(lambda: take("zero"), dtype=qtype, shape=s_shape))
    return out


class QuantizeWeightsPass(Pass, ir.passes.InPlacePass):
    """Quantize the weights `scheme` selects, as the module docstring shows; `quantized` lists them."""

    def __init__(self, scheme: WeightQuant, *, where: str = "") -> None:
        self.scheme = scheme
        self.where = where  # ends a block-size error, e.g. " on rank 1 at tp=2"
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        b = self.scheme.block_size
        for value in list(g.initializers.values()):
            tensor = value.const_value
            if tensor is None or value.shape is None or len(value.shape) != 2:
                continue
            if not tensor.dtype.is_floating_point() or not self.scheme.quantizes(param_name(value.name)):
                continue
            axis = _block_axis(value)
            if axis is None:
                continue
            param = param_name(value.name)
            rows, k = (value.shape[1], value.shape[0]) if axis == 0 else (value.shape[0], value.shape[1])
            check_blocks(param, k, b, hint=self.where)
            q_shape = ir.Shape(list(value.shape))
            s_shape = ir.Shape([k // b, rows] if axis == 0 else [rows, k // b])
            lazies = _lazy_quantized(tensor, axis, self.scheme.at(param), q_shape, s_shape)
            inputs = [ir.Value(name=f"{value.name}_{suffix}", const_value=lazy)
                      for suffix, lazy in zip(("q", "scale", "zero"), lazies)]
            for v in inputs:
                v.const_value.name = v.name
                v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
            first = next(iter(value.uses()))[0]
            path = first.name.rsplit("/", 1)[0] if first.name and "/" in first.name else value.name
            dq = ir.node("DequantizeLinear", inputs, {"axis": axis, "block_size": b},
                         name=f"{path}/DequantizeLinear")
            dq.outputs[0].name = f"{path}/DequantizeLinear_output_0"
            dq.outputs[0].dtype, dq.outputs[0].shape = tensor.dtype, value.shape
            g.insert_before(first, dq)
            ir.convenience.replace_all_uses_with(value, dq.outputs[0])
            g.initializers.pop(value.name)
            for v in inputs:
                g.register_initializer(v)
            self.quantized.append(param)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def ensures(self, model: ir.Model) -> None:
        names = [n.name for n in model.graph if n.op_type == "DequantizeLinear"]
        if len(set(names)) != len(names):
            raise ArtifactError("two quantized weights share a node path; their DequantizeLinear names collide")
