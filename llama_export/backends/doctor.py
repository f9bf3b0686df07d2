"""`llama-export doctor`: what this machine can run, one line per thing, each with what to do about it.

    python, torch (and its CUDA build), onnxruntime / onnxruntime-gpu, tensorrt, triton
    GPUs (name, compute capability, memory) as torch sees them
    ONNX Runtime: a tiny in-memory model opened with the providers a run would ask for, and the
        providers that session really uses (`session.get_providers()`: ONNX Runtime drops a provider
        whose libraries do not load, with only a warning on its own log)
    TensorRT (importable with NVIDIA's libraries) and NCCL (torch.distributed.is_nccl_available())

A check is "ok", "warn" (works, with a caveat) or "missing" (that path cannot run here). The CPU path
(torch and ONNX Runtime's CPU provider) decides the exit code: `cpu_path_ok`.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass
from typing import Any, Literal

from llama_export.errors import BackendUnavailableError

Status = Literal["ok", "warn", "missing"]

CUDA_TORCH_FIX = ("install a CUDA build of torch (the command for your CUDA version is on pytorch.org), "
                  "then pip install -e '.[gpu]', which keeps it")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do; empty for ok

    def line(self) -> str:
        return f"{self.status:<8}{self.name:<14}{self.detail}" + (f"; {self.fix}" if self.fix else "")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    return Check("python", "ok", f"{platform.python_version()} ({platform.machine()}, {platform.system()})")


def check_torch() -> list[Check]:
    """torch, its CUDA build and the GPUs it sees, and NCCL."""
    try:
        import torch
    except ImportError:
        return [Check("torch", "missing", "not installed", "pip install -e '.[cpu]' (CPU) or " + CUDA_TORCH_FIX)]
    cuda = torch.version.cuda
    out = [Check("torch", "ok", f"{torch.__version__} (" + (f"CUDA {cuda} build" if cuda else "CPU build") + ")")]
    if not cuda:
        out.append(Check("gpus", "missing", "this torch is a CPU build: no CUDA device", CUDA_TORCH_FIX))
    elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        out.append(Check("gpus", "missing", "this CUDA torch sees no GPU",
                         "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"))
    else:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gib = torch.cuda.get_device_properties(i).total_memory / (1 << 30)
            detail = f"cuda:{i} {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}, {gib:.1f} GiB"
            if (major, minor) < (8, 0):  # bf16 tensor cores and TensorRT 11's kernels start at Ampere
                out.append(Check("gpu", "warn", detail + " (older than 8.0: no bf16)", "export fp16 for this GPU"))
            else:
                out.append(Check("gpu", "ok", detail))
    dist = torch.distributed.is_available()
    if dist and torch.distributed.is_nccl_available():
        out.append(Check("nccl", "ok", "available: --tp N on --device cuda"))
    else:
        out.append(Check("nccl", "missing", "not in this torch build: --tp N runs on CPU (gloo) only",
                         CUDA_TORCH_FIX))
    return out


def _tiny_model() -> bytes:
    """A one-node ONNX model (y = x + x, fp32 [2]), serialized."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def _provider_name(p: Any) -> str:
    return p[0] if isinstance(p, tuple) else p


def check_onnxruntime(want_cuda: bool) -> list[Check]:
    """The installed distribution(s), and a session opened on the CPU (and on CUDA where `want_cuda`
    or the runtime has the CUDA provider) with the providers it really uses."""
    from llama_export.backends.ort import import_onnxruntime, session_providers

    cpu_dist, gpu_dist = _dist_version("onnxruntime"), _dist_version("onnxruntime-gpu")
    try:
        ort = import_onnxruntime()
    except BackendUnavailableError as e:  # the message says what to install
        return [Check("onnxruntime", "missing", str(e))]
    names = ", ".join(f"{d} {v}" for d, v in (("onnxruntime", cpu_dist), ("onnxruntime-gpu", gpu_dist)) if v)
    out = []
    if cpu_dist and gpu_dist:
        out.append(Check("onnxruntime", "warn", f"both {names} are installed; they write the same package, "
                         f"{ort.__version__} is the one imported",
                         "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install -e '.[cpu]' or '.[gpu]'"))
    else:
        out.append(Check("onnxruntime", "ok", f"{ort.__version__} ({names or 'distribution unknown'})"))
    from llama_export.backends.ort import runtime

    if not runtime.fused_attention(ort):
        out.append(Check("ort-attention", "warn", f"onnxruntime {ort.__version__}'s GroupQueryAttention has no "
                         "query_seqlens: attention runs unfused (correct, slower)",
                         "onnxruntime >= 1.32 runs the fused lowering"))
    model = _tiny_model()
    devices = ["cpu"]
    if want_cuda or "CUDAExecutionProvider" in ort.get_available_providers():
        devices.append("cuda")
    for device in devices:
        name = f"ort-{device}"
        try:
            asked = session_providers(ort, device)
        except BackendUnavailableError as e:
            out.append(Check(name, "missing", str(e)))
            continue
        try:
            import numpy as np

            session = ort.InferenceSession(model, providers=asked)
            session.run(None, {"x": np.ones(2, np.float32)})
            used = session.get_providers()
        except Exception as e:  # noqa: BLE001 - any failure to open or run is the finding itself
            out.append(Check(name, "missing", f"a session on {[_provider_name(p) for p in asked]} failed: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             "reinstall onnxruntime (pip install -e '.[cpu]' or '.[gpu]')"))
            continue
        detail = f"asked {[_provider_name(p) for p in asked]}, the session uses {used}"
        if _provider_name(asked[0]) != used[0]:
            out.append(Check(name, "missing", detail + f" ({_provider_name(asked[0])} did not load)",
                             "install the CUDA and cuDNN libraries onnxruntime-gpu was built for "
                             "(pip install onnxruntime-gpu[cuda,cudnn]) or check LD_LIBRARY_PATH"))
        else:
            out.append(Check(name, "ok", detail))
    return out


def check_tensorrt() -> Check:
    from llama_export.backends.tensorrt.plugins import INSTALL_HINT

    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the bindings are there, NVIDIA's libraries are not
        bindings = _dist_version("tensorrt-cu13-bindings")
        extra = f" (tensorrt-cu13-bindings {bindings} alone: the CPU conformance checks only)" if bindings else ""
        return Check("tensorrt", "missing", f"not importable: {type(e).__name__}: {e}{extra}", INSTALL_HINT)
    return Check("tensorrt", "ok", f"{trt.__version__}: llama-export build / --backend trt")


def check_triton() -> Check:
    try:
        import triton
    except ImportError:
        return Check("triton", "missing", "not installed: the TensorRT plugins' kernels need it",
                     "a CUDA torch brings its own triton; on CPU pip install -e '.[triton]'")
    return Check("triton", "ok", f"{triton.__version__}")


def report() -> list[Check]:
    """Every check, in the order printed."""
    checks = [check_python()]
    torch_checks = check_torch()
    checks += torch_checks
    want_cuda = any(c.name == "gpu" for c in torch_checks)
    checks += check_onnxruntime(want_cuda)
    checks += [check_tensorrt(), check_triton()]
    return checks


def cpu_path_ok(checks: list[Check]) -> bool:
    """torch imports and an ONNX Runtime session runs on the CPU provider."""
    by_name = {c.name: c for c in checks}
    return by_name.get("torch", Check("", "missing", "")).status == "ok" and \
        by_name.get("ort-cpu", Check("", "missing", "")).status == "ok"
