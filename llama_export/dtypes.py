"""Element types, each spelled once for every library that names it.

    name       torch            onnx TensorProto   safetensors  precision
    float32    torch.float32    FLOAT              F32          fp32
    float16    torch.float16    FLOAT16            F16          fp16
    bfloat16   torch.bfloat16   BFLOAT16           BF16         bf16
    float64    torch.float64    DOUBLE             F64          -
    int64 / int32 / int8 / uint8 / bool: integer and mask types graphs and engines use

`name` is the numpy spelling the manifest records; TensorRT's Python enums use the same names
(`tensorrt.float32`, `tensorrt.bfloat16`, ...), so the TensorRT backend derives its table from it; so
does torch (`torch.float32`), which is therefore only imported when a `DType.torch` is asked for: the
ONNX Runtime run path never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from onnx import TensorProto

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str
    onnx: int
    safetensors: str | None = None
    precision: str | None = None  # Precision value ("fp16") for the float types a model can run in

    @property
    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)

    @property
    def is_float(self) -> bool:
        return self.onnx in _FLOAT_ONNX


_FLOAT_ONNX = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)

DTYPES: tuple[DType, ...] = (
    DType("float32", TensorProto.FLOAT, "F32", "fp32"),
    DType("float16", TensorProto.FLOAT16, "F16", "fp16"),
    DType("bfloat16", TensorProto.BFLOAT16, "BF16", "bf16"),
    DType("float64", TensorProto.DOUBLE, "F64"),
    DType("int64", TensorProto.INT64, "I64"),
    DType("int32", TensorProto.INT32, "I32"),
    DType("int8", TensorProto.INT8, "I8"),
    DType("uint8", TensorProto.UINT8, "U8"),
    DType("bool", TensorProto.BOOL, "BOOL"),
)

FLOAT_TYPES: tuple[DType, ...] = tuple(d for d in DTYPES if d.is_float)


def _index(key: str) -> dict:
    return {getattr(d, key): d for d in DTYPES if getattr(d, key) is not None}


_BY_NAME, _BY_ONNX, _BY_SAFETENSORS, _BY_PRECISION = (
    _index(k) for k in ("name", "onnx", "safetensors", "precision"))


def by_name(name: str) -> DType:
    return _BY_NAME[name]


def by_torch(dtype: torch.dtype) -> DType:
    return _BY_NAME[str(dtype).removeprefix("torch.")]


def by_onnx(elem_type: int) -> DType:
    return _BY_ONNX[elem_type]


def by_safetensors(code: str) -> DType | None:
    return _BY_SAFETENSORS.get(code)


def by_precision(value: str) -> DType:
    return _BY_PRECISION[value]
