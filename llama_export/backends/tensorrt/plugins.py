"""TensorRT Python plugins (`tensorrt.plugin`, "quickly deployable plugins") for RMSNorm and RoPE.

Registered on demand by `register_plugins()`; importing this module never imports tensorrt.

    llama_export::RMSNorm(x [..., D], weight [D], epsilon: float) -> y like x
    llama_export::RoPE(x [B, S, H, D], cos [P, D/2] fp32, sin [P, D/2] fp32, start [B] int64,
                       interleaved: int) -> y like x

The graph contract's semantics (`artifact/schema.py`, version 2): RoPE rotates token (b, i) by table row
start[b] + i of the model's full tables. I/O dtypes fp32 / fp16 / bf16 (x, weight and y share one),
`start` int64 as in the graph (TensorRT plugins take INT64 tensors; the lowering needs no Cast), linear
layout. D (and H for RoPE) must be static in the network; batch, sequence and P may be dynamic.

Each op has (TensorRT Python API docs, section "tensorrt.plugin"):
- `@trtp.register`: shape/type inference, output = `x.like()`.
- `@trtp.autotune`: the supported type/format combinations ('|' ties the I/O types together).
- `@trtp.aot_impl`: returns (kernel name, PTX, `KernelLaunchParams`, `SymIntExprs` extra args), compiled
  by `aot.compile_plan` from the same `LaunchPlan` the Python launch uses; the PTX entry takes exactly
  the input pointers, the extra args and the output pointers TensorRT passes (RoPE: x, cos, sin, start,
  then the int32 extra args S and P, then y). The engine then runs without Python. Attributes are not serialized with AOT, so epsilon / interleaved are compiled into
  the PTX as constexprs.
- `@trtp.impl`: JIT fallback calling the Triton helpers on TensorRT's stream. Tensors reach torch through
  `cuda_array_interface` (tensorrt.plugin's own `Tensor.__cuda_array_interface__` refuses BF16).
Which one an engine uses is chosen per network with `NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS`
/ `PREFER_JIT_PYTHON_PLUGINS`.

The ONNX parser finds these plugins for nodes lowered by `lowering.py` (op type + plugin_namespace +
plugin_version "1"). Checked against the real TensorRT 11.4 Python package on CPU
(`tests/tensorrt/conformance/`): registration, the parser's plugin creation, shape/type inference, format
combinations, launch parameters and kernel retrieval (AOT), field serialization, runtime re-creation
and enqueue (JIT), with TensorRT's C++ objects faked. Not run: an engine build or execution on a GPU.
"""

# No `from __future__ import annotations`: tensorrt.plugin validates the decorated functions'
# annotations (inspect.signature) and needs real classes there, not strings.

import logging
import threading
from collections.abc import Callable
from typing import Any

from llama_export import dtypes
from llama_export.errors import BackendUnavailableError
from llama_export.artifact import schema

log = logging.getLogger(__name__)

RMS_NORM_ID = f"{schema.DOMAIN}::{schema.RMS_NORM}"
ROPE_ID = f"{schema.DOMAIN}::{schema.ROPE}"
INSTALL_HINT = (
    "install TensorRT 11 and its Python bindings on a machine with an NVIDIA GPU: "
    "pip install -e '.[gpu,tensorrt]' (the tensorrt wheels fetch NVIDIA's libraries from NVIDIA's index)"
)
_TYPES = "FP32|FP16|BF16"  # x, weight and y share one of these (AutoTuneCombination syntax)

_lock = threading.Lock()
_registered = False


def import_tensorrt() -> Any:
    """`import tensorrt`, or BackendUnavailableError saying what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: bindings present but libnvinfer missing
        raise BackendUnavailableError(f"TensorRT is not available ({e}); {INSTALL_HINT}") from None
    return trt


def _io_dtype(trt: Any, dtype: Any) -> dtypes.DType:
    """The entry of `dtypes` for a TensorRT dtype of a plugin input or output."""
    for d in dtypes.DTYPES:
        if getattr(trt, d.name, None) == dtype:
            return d
    raise ValueError(f"llama_export plugins take fp32/fp16/bf16 activations and int64 positions, got {dtype}")


def _trt_dtype_name(trt: Any, dtype: Any) -> str:
    """"fp32" / "fp16" / "bf16" for a TensorRT float dtype (the Triton kernels' spelling)."""
    d = _io_dtype(trt, dtype)
    if d.precision is None:
        raise ValueError(f"llama_export plugins support fp32/fp16/bf16 activations, got {dtype}")
    return d.precision


def _static(expr: "trtp.ShapeExpr | int", what: str) -> int:
    """A shape expression that must be a build-time constant (hidden size, heads, head_dim)."""
    if isinstance(expr, int):
        return expr
    if not expr.is_constant:
        raise ValueError(f"{what} must be static in the network to compile the plugin kernel")
    return int(expr.constant_value())


def _aot_result(trtp: Any, plan: Any) -> tuple[str, str, Any, Any]:
    import torch

    from llama_export.backends.tensorrt import aot

    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    k = aot.compile_plan(plan, arch=10 * major + minor)

    def sym(v: Any) -> Any:
        return v if isinstance(v, int) else trtp.SymInt32(v)

    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = (sym(g) for g in k.grid)
    params.block_x, params.block_y, params.block_z = k.block
    params.shared_mem = k.shared_mem
    extra = trtp.SymIntExprs(len(k.scalars))
    for i, (_, value) in enumerate(k.scalars):
        extra[i] = trtp.SymInt32(value)
    return k.name, k.ptx, params, extra


def cuda_array_interface(trt: Any, t: "trtp.Tensor") -> tuple[dict[str, Any], Any]:
    """`__cuda_array_interface__` (version 3) of a JIT plugin tensor, and the torch dtype to view it as.

    The typestr is numpy's for the dtype's name (as tensorrt.plugin's own interface has it); BF16 has
    no numpy type, so it is described as int16 (same size) and viewed as torch.bfloat16. Strides:
    TensorRT gives elements, the interface wants bytes. "stream": None, the caller launches on
    TensorRT's stream itself.
    """
    import numpy as np
    import torch

    d = _io_dtype(trt, t.dtype)
    itemsize = d.torch.itemsize
    iface = {
        "shape": tuple(int(n) for n in t.shape),
        "typestr": "<i2" if d.torch == torch.bfloat16 else np.dtype(d.name).str,
        "data": (int(t.data_ptr), False),
        "strides": tuple(int(s) * itemsize for s in t.strides),
        "version": 3,
        "stream": None,
    }
    return iface, d.torch


class _CudaArray:
    def __init__(self, iface: dict[str, Any]) -> None:
        self.__cuda_array_interface__ = iface


def _as_torch(trt: Any, t: Any) -> Any:
    """A torch CUDA tensor over the memory of JIT plugin tensor `t` (no copy). "cuda" is the current
    device, which `TensorRTBackend` makes the rank's own around every engine call (a tensor of another
    device would be copied, and the kernel would write the copy)."""
    import torch

    iface, dtype = cuda_array_interface(trt, t)
    storage = torch.as_tensor(_CudaArray(iface), device="cuda")
    return storage if storage.dtype == dtype else storage.view(dtype)


def _on_stream(stream: int) -> Any:
    """Context in which torch and Triton launch on TensorRT's CUDA stream `stream` (a stream of the
    current device: see `_as_torch`)."""
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def _define_once(trtp: Any, plugin_id: str, describe: Callable[..., Any]) -> None:
    """`@trtp.register(plugin_id)` unless an earlier call in this process already did.

    tensorrt.plugin refuses a second registration of a name, so a retry after a failure further on
    (an implementation rejected by its validation) must not register again; the implementations are
    (re)attached by the caller either way.
    """
    namespace, name = plugin_id.split("::")
    try:
        getattr(getattr(trtp.op, namespace), name)
    except AttributeError:
        trtp.register(plugin_id)(describe)


def _define_rms_norm(trt: Any, trtp: Any) -> None:
    from llama_export.backends.tensorrt import kernels

    def rms_norm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float) -> trtp.TensorDesc:
        return x.like()

    _define_once(trtp, RMS_NORM_ID, rms_norm_desc)

    @trtp.autotune(RMS_NORM_ID)
    def rms_norm_autotune(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(f"{_TYPES}, {_TYPES}, {_TYPES}", "LINEAR")]

    @trtp.aot_impl(RMS_NORM_ID)
    def rms_norm_aot(
        x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dims = [x.shape_expr[i] for i in range(len(x.shape_expr))]
        dims[-1] = _static(dims[-1], "RMSNorm hidden size")
        plan = kernels.rms_norm_launch(tuple(dims), _trt_dtype_name(trt, x.dtype), epsilon)
        return _aot_result(trtp, plan)

    @trtp.impl(RMS_NORM_ID)
    def rms_norm_jit(
        x: trtp.Tensor, weight: trtp.Tensor, epsilon: float, outputs: tuple[trtp.Tensor], stream: int
    ) -> None:
        with _on_stream(stream):
            kernels.rms_norm(_as_torch(trt, x), _as_torch(trt, weight), epsilon, out=_as_torch(trt, outputs[0]))


def _define_rope(trt: Any, trtp: Any) -> None:
    from llama_export.backends.tensorrt import kernels

    def rope_desc(
        x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, start: trtp.TensorDesc, interleaved: int
    ) -> trtp.TensorDesc:
        return x.like()

    _define_once(trtp, ROPE_ID, rope_desc)

    @trtp.autotune(ROPE_ID)
    def rope_autotune(
        x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, start: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        tables, positions = "FP32|FP32|FP32", "INT64|INT64|INT64"
        return [trtp.AutoTuneCombination(f"{_TYPES}, {tables}, {tables}, {positions}, {_TYPES}", "LINEAR")]

    @trtp.aot_impl(ROPE_ID)
    def rope_aot(
        x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, start: trtp.TensorDesc, interleaved: int,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        s = x.shape_expr
        shape = (s[0], s[1], _static(s[2], "RoPE heads"), _static(s[3], "RoPE head_dim"))
        plan = kernels.rope_launch(shape, _trt_dtype_name(trt, x.dtype), bool(interleaved), cos.shape_expr[0])
        return _aot_result(trtp, plan)

    @trtp.impl(ROPE_ID)
    def rope_jit(
        x: trtp.Tensor, cos: trtp.Tensor, sin: trtp.Tensor, start: trtp.Tensor, interleaved: int,
        outputs: tuple[trtp.Tensor], stream: int,
    ) -> None:
        with _on_stream(stream):
            kernels.rope(_as_torch(trt, x), _as_torch(trt, cos), _as_torch(trt, sin), _as_torch(trt, start),
                         bool(interleaved), out=_as_torch(trt, outputs[0]))


def register_plugins() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent, thread-safe).

    If tensorrt.plugin rejects a definition, raises BackendUnavailableError; calling again repeats the
    same checks (nothing is registered twice) and completes the registration once they pass.
    """
    global _registered
    with _lock:
        if _registered:
            return
        trt = import_tensorrt()
        import tensorrt.plugin as trtp

        try:
            _define_rms_norm(trt, trtp)
            _define_rope(trt, trtp)
        except (ValueError, TypeError) as e:
            raise BackendUnavailableError(
                f"tensorrt.plugin {trt.__version__} rejected the llama_export plugin definitions: {e}"
            ) from e
        _registered = True
        log.info("registered TensorRT plugins %s and %s", RMS_NORM_ID, ROPE_ID)
