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
        return "float" in self.name  # float16/32/64, bfloat16


# `onnx` below: `onnx.TensorProto.DataType` values, fixed by the ONNX standard (onnx.proto), spelled here so
# that the run path does not import onnx (`tests/test_config.py` checks them against onnx.TensorProto).

DTYPES: tuple[DType, ...] = (
    DType("float32", 1, "F32", "fp32"),  # FLOAT
    DType("float16", 10, "F16", "fp16"),  # FLOAT16
    DType("bfloat16", 16, "BF16", "bf16"),  # BFLOAT16
    DType("float64", 11, "F64"),  # DOUBLE
    DType("int64", 7, "I64"),  # INT64
    DType("int32", 6, "I32"),  # INT32
    DType("int8", 3, "I8"),  # INT8
    DType("uint8", 2, "U8"),  # UINT8
    DType("bool", 9, "BOOL"),  # BOOL
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
