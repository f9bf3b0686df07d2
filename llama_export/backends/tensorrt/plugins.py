"""TensorRT Python plugins (`tensorrt.plugin`, "quickly deployable plugins") for RMSNorm and RoPE.

Registered on demand by `register_plugins()`; importing this module never imports tensorrt.

    llama_export::RMSNorm(x [..., D], weight [D], epsilon: float) -> y like x
    llama_export::RoPE(x [B, S, H, D], cos [S, D/2] fp32, sin [S, D/2] fp32, interleaved: int) -> y like x

I/O dtypes fp32 / fp16 / bf16 (x, weight and y share one), linear layout. D (and H for RoPE) must be
static in the network; batch and sequence may be dynamic.

Each op has (TensorRT Python API docs, section "tensorrt.plugin"):
- `@trtp.register`: shape/type inference, output = `x.like()` ("tensorrt.plugin.register").
- `@trtp.autotune`: the supported type/format combinations ("tensorrt.plugin.autotune",
  "AutoTuneCombination": '|' ties the I/O types together).
- `@trtp.aot_impl`: returns (kernel name, PTX, `KernelLaunchParams`, `SymIntExprs` extra args), compiled
  by `aot.compile_plan` from the same `LaunchPlan` the Python launch uses ("tensorrt.plugin.aot_impl":
  extra args sit after the tensor inputs and before the outputs, as our kernels declare them). The
  engine then runs without Python. Attributes are not serialized with AOT, so epsilon / interleaved
  are compiled into the PTX as constexprs.
- `@trtp.impl`: JIT fallback calling the Triton launch helpers on TensorRT's stream ("tensorrt.plugin.impl").
Which one an engine uses is chosen per network with `NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS`
/ `PREFER_JIT_PYTHON_PLUGINS` (TensorRT 11 Python API, "Builder").

The ONNX parser finds these plugins for nodes lowered by `lowering.py` (op type + plugin_namespace +
plugin_version "1"). None of this has run against a real TensorRT in this project's environment.
"""

import logging
import threading
from typing import Any

from llama_export import dtypes
from llama_export.errors import BackendUnavailableError
from llama_export.artifact import schema

log = logging.getLogger(__name__)

RMS_NORM_ID = f"{schema.DOMAIN}::{schema.RMS_NORM}"
ROPE_ID = f"{schema.DOMAIN}::{schema.ROPE}"
INSTALL_HINT = (
    "install TensorRT 11 and its Python bindings on a machine with an NVIDIA GPU: "
    "pip install 'llama_export[gpu]' (the tensorrt wheels fetch NVIDIA's libraries from NVIDIA's index)"
)

_lock = threading.Lock()
_registered = False


def import_tensorrt() -> Any:
    """`import tensorrt`, or BackendUnavailableError saying what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: bindings present but libnvinfer missing
        raise BackendUnavailableError(f"TensorRT is not available ({e}); {INSTALL_HINT}") from None
    return trt


def _trt_dtype_name(trt: Any, dtype: Any) -> str:
    """"fp32" / "fp16" / "bf16" for a TensorRT float dtype (the Triton kernels' spelling)."""
    for d in dtypes.FLOAT_TYPES:
        if d.precision is not None and getattr(trt, d.name, None) == dtype:
            return d.precision
    raise ValueError(f"llama_export plugins support fp32/fp16/bf16, got {dtype}")


def _static(expr: Any, what: str) -> int:
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
        extra[i] = sym(value)
    if k.trailing_params:
        log.debug("%s: PTX has %d trailing Triton scratch parameter(s)", k.name, k.trailing_params)
    return k.name, k.ptx, params, extra


def register_plugins() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent, thread-safe)."""
    global _registered
    with _lock:
        if _registered:
            return
        import_tensorrt()
        import tensorrt as trt
        import tensorrt.plugin as trtp
        import torch

        from llama_export.backends.tensorrt import kernels

        types = "FP32|FP16|BF16"

        # ---- RMSNorm ------------------------------------------------------------------------------
        @trtp.register(RMS_NORM_ID)
        def rms_norm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float) -> trtp.TensorDesc:
            return x.like()

        @trtp.autotune(RMS_NORM_ID)
        def rms_norm_autotune(x: trtp.TensorDesc, weight: trtp.TensorDesc, outputs):
            return [trtp.AutoTuneCombination(f"{types}, {types}, {types}", "LINEAR")]

        @trtp.aot_impl(RMS_NORM_ID)
        def rms_norm_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, epsilon: float, outputs, tactic):
            dims = [x.shape_expr[i] for i in range(len(x.shape_expr))]
            dims[-1] = _static(dims[-1], "RMSNorm hidden size")
            plan = kernels.rms_norm_launch(tuple(dims), _trt_dtype_name(trt, x.dtype), epsilon)
            return _aot_result(trtp, plan)

        @trtp.impl(RMS_NORM_ID)
        def rms_norm_jit(x: trtp.Tensor, weight: trtp.Tensor, epsilon: float, outputs, stream: int) -> None:
            xt, wt = torch.as_tensor(x, device="cuda"), torch.as_tensor(weight, device="cuda")
            yt = torch.as_tensor(outputs[0], device="cuda")
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                kernels.rms_norm(xt, wt, epsilon, out=yt)

        # ---- RoPE ---------------------------------------------------------------------------------
        @trtp.register(ROPE_ID)
        def rope_desc(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, interleaved: int) -> trtp.TensorDesc:
            return x.like()

        @trtp.autotune(ROPE_ID)
        def rope_autotune(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, outputs):
            return [trtp.AutoTuneCombination(f"{types}, FP32|FP32|FP32, FP32|FP32|FP32, {types}", "LINEAR")]

        @trtp.aot_impl(ROPE_ID)
        def rope_aot(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc, interleaved: int, outputs, tactic):
            s = x.shape_expr
            shape = (s[0], s[1], _static(s[2], "RoPE heads"), _static(s[3], "RoPE head_dim"))
            plan = kernels.rope_launch(shape, _trt_dtype_name(trt, x.dtype), bool(interleaved))
            return _aot_result(trtp, plan)

        @trtp.impl(ROPE_ID)
        def rope_jit(x: trtp.Tensor, cos: trtp.Tensor, sin: trtp.Tensor, interleaved: int, outputs, stream: int) -> None:
            xt = torch.as_tensor(x, device="cuda")
            ct, st = torch.as_tensor(cos, device="cuda"), torch.as_tensor(sin, device="cuda")
            yt = torch.as_tensor(outputs[0], device="cuda")
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                kernels.rope(xt, ct, st, bool(interleaved), out=yt)

        _registered = True
        log.info("registered TensorRT plugins %s and %s", RMS_NORM_ID, ROPE_ID)
