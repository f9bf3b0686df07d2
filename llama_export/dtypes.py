"""Element types, each spelled once for every library that names it.

    name       torch            onnx TensorProto   safetensors  precision
    float32    torch.float32    FLOAT              F32          fp32
    float16    torch.float16    FLOAT16            F16          fp16
    bfloat16   torch.bfloat16   BFLOAT16           BF16         bf16
    float64    torch.float64    DOUBLE             F64          -
    int64 / int32 / int8 / uint8 / bool: integer and mask types graphs and engines use

`name` is the numpy spelling the manifest records; TensorRT's Python enums use the same names
(`tensorrt.float32`, `tensorrt.bfloat16`, ...), so the TensorRT backend derives its table from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from onnx import TensorProto


@dataclass(frozen=True)
class DType:
    name: str
    torch: torch.dtype
    onnx: int
    safetensors: str | None = None
    precision: str | None = None  # Precision value ("fp16") for the float types a model can run in


DTYPES: tuple[DType, ...] = (
    DType("float32", torch.float32, TensorProto.FLOAT, "F32", "fp32"),
    DType("float16", torch.float16, TensorProto.FLOAT16, "F16", "fp16"),
    DType("bfloat16", torch.bfloat16, TensorProto.BFLOAT16, "BF16", "bf16"),
    DType("float64", torch.float64, TensorProto.DOUBLE, "F64"),
    DType("int64", torch.int64, TensorProto.INT64, "I64"),
    DType("int32", torch.int32, TensorProto.INT32, "I32"),
    DType("int8", torch.int8, TensorProto.INT8, "I8"),
    DType("uint8", torch.uint8, TensorProto.UINT8, "U8"),
    DType("bool", torch.bool, TensorProto.BOOL, "BOOL"),
)

FLOAT_TYPES: tuple[DType, ...] = tuple(d for d in DTYPES if d.torch.is_floating_point)


def _index(key: str) -> dict:
    return {getattr(d, key): d for d in DTYPES if getattr(d, key) is not None}


_BY_NAME, _BY_TORCH, _BY_ONNX, _BY_SAFETENSORS, _BY_PRECISION = (
    _index(k) for k in ("name", "torch", "onnx", "safetensors", "precision"))


def by_name(name: str) -> DType:
    return _BY_NAME[name]


def by_torch(dtype: torch.dtype) -> DType:
    return _BY_TORCH[dtype]


def by_onnx(elem_type: int) -> DType:
    return _BY_ONNX[elem_type]


def by_safetensors(code: str) -> DType | None:
    return _BY_SAFETENSORS.get(code)


def by_precision(value: str) -> DType:
    return _BY_PRECISION[value]
