#!/usr/bin/env python
"""GPU check of the TensorRT plugin kernels, without TensorRT: run from the repository root.

    PYTHONPATH=. python scripts/gpu_check_trt.py [--quick] [--json report.json]

1. Triton JIT kernels vs the torch references (fp32/fp16/bf16, RoPE interleaved and rotate-half). RoPE
   is the graph contract's v2: the model's full tables [P, D/2] and a ragged int64 `start` per row;
   a row whose positions run past the table must come out NaN, not read beyond it.
2. The AOT PTX (sm_80 and, on Hopper, sm_90) loaded through the CUDA driver (ctypes on libcuda) and
   launched exactly as the plugin's aot_impl describes it: grid, block, shared memory, int32 extra
   args between the input and output pointers, nothing else (the entry declares exactly those; RoPE:
   x, cos, sin, start, then S and P, then y).
3. Timing of each kernel vs the torch reference (ratio > 1: the kernel is faster).
Exit status: 0 all passed, 1 a check failed, 2 no GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from collections.abc import Callable

from llama_export.tolerances import kernel_tolerance


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    return p.parse_args(argv)


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def check(self, name: str, fn: Callable[[], dict[str, object]]) -> None:
        try:
            row = {"check": name, **fn()}
        except Exception as e:  # report and go on: one broken check must not hide the others
            row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc(limit=3)
        self.rows.append(row)
        extra = " ".join(f"{k}={v}" for k, v in row.items() if k not in ("check", "ok"))
        print(f"{'PASS' if row.get('ok') else 'FAIL'}  {name:<52} {extra}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not r.get("ok") for r in self.rows)


def _compare(got, want, dtype_name: str) -> dict[str, object]:
    tol = kernel_tolerance(dtype_name)
    err = (got.float() - want.float()).abs()
    ratio = float((err / (tol + tol * want.float().abs())).max()) if err.numel() else 0.0
    return {"ok": ratio <= 1.0 and got.dtype == want.dtype, "max_abs": f"{float(err.max()):.2e}", "tol_ratio": f"{ratio:.3f}"}


class Driver:
    """Minimal CUDA driver API through ctypes: load PTX, launch a function."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.modules: list[ctypes.c_void_p] = []

    def _ok(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")

    def load(self, ptx: str, name: str) -> ctypes.c_void_p:
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self._ok(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx.encode() + b"\0")), "cuModuleLoadData")
        self.modules.append(mod)
        self._ok(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), "cuModuleGetFunction")
        return fn

    def launch(self, fn, grid, block, shared: int, stream: int, args: list[ctypes._SimpleCData]) -> None:
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        rc = self.lib.cuLaunchKernel(fn, *[ctypes.c_uint(v) for v in grid], *[ctypes.c_uint(v) for v in block],
                                     ctypes.c_uint(shared), ctypes.c_void_p(stream), params, None)
        self._ok(rc, "cuLaunchKernel")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("no GPU: torch is not installed")
        return 2
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing to check here")
        return 2
    from llama_export.backends.tensorrt import aot, kernels
    from llama_export.model.ops import rms_norm_reference, rope_reference

    import triton

    cc = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()} sm_{cc[0]}{cc[1]}, torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}")
    dev = "cuda"
    rep = Report()
    dtypes = ("float32", "float16", "bfloat16")
    rms_shapes = [(2, 1, 64), (2, 7, 4096), (3, 5, 96)] + ([] if args.quick else [(4, 33, 8192), (1, 1, 5120)])
    rope_shapes = [(2, 1, 4, 64), (2, 7, 8, 128), (1, 5, 3, 96)] + ([] if args.quick else [(4, 33, 32, 128)])
    g = torch.Generator(device=dev).manual_seed(0)

    def rms_inputs(shape, dt):
        dtype = getattr(torch, dt)
        return (torch.randn(shape, generator=g, device=dev).to(dtype),
                (torch.rand(shape[-1], generator=g, device=dev) + 0.5).to(dtype))

    def rope_inputs(shape, dt, table_rows=None):
        """x, the model's tables cos/sin [P, D/2] (P = S + 40 unless given) and a ragged start [B] whose
        last row reaches the table's last position."""
        b, seq, _, d = shape
        rows = table_rows or seq + 40
        x = torch.randn(shape, generator=g, device=dev).to(getattr(torch, dt))
        half = d // 2
        inv = 1.0 / (10000.0 ** (torch.arange(half, device=dev, dtype=torch.float32) / half))
        ang = torch.outer(torch.arange(rows, device=dev, dtype=torch.float32), inv)
        start = torch.tensor([(7 * i) % (rows - seq) for i in range(b - 1)] + [rows - seq], device=dev)
        return x, ang.cos().contiguous(), ang.sin().contiguous(), start

    # 1. Triton JIT vs reference ------------------------------------------------------------------
    for dt in dtypes:
        for shape in rms_shapes:
            def jit_rms(shape=shape, dt=dt):
                x, w = rms_inputs(shape, dt)
                return _compare(kernels.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), dt)
            rep.check(f"jit rms_norm {dt} {list(shape)}", jit_rms)
        for shape in rope_shapes:
            for il in (True, False):
                def jit_rope(shape=shape, dt=dt, il=il):
                    x, c, s, st = rope_inputs(shape, dt)
                    return _compare(kernels.rope(x, c, s, st, il), rope_reference(x, c, s, st, il), dt)
                rep.check(f"jit rope {dt} {list(shape)} {'interleaved' if il else 'rotate_half'}", jit_rope)

    def rope_outside_table():
        x, c, s, _ = rope_inputs((2, 3, 2, 64), "float32", table_rows=8)
        st = torch.tensor([5, 6], device=dev)  # row 1 reaches position 8 = P: outside the table
        y = kernels.rope(x, c, s, st, True)
        torch.cuda.synchronize()
        nan = torch.full((1, c.shape[1]), float("nan"), device=dev)
        want = rope_reference(x, torch.cat([c, nan]), torch.cat([s, nan]), st, True)
        tol = kernel_tolerance("float32")
        ok = bool(torch.allclose(y, want, atol=tol, rtol=tol, equal_nan=True))
        return {"ok": ok and int(y.isnan().flatten(2).any(-1).sum()) == 1}
    rep.check("jit rope position outside the table -> NaN", rope_outside_table)

    # 2. AOT PTX through the driver, launched as the plugin describes ------------------------------
    archs = [a for a in aot.ARCHS if a <= 10 * cc[0] + cc[1]]
    try:
        drv = Driver()
    except OSError as e:
        rep.check("load libcuda", lambda e=e: {"ok": False, "error": str(e)})
        drv = None

    def run_ptx(plan, arch, inputs, outputs):
        k = aot.compile_plan(plan, arch=arch)
        fn = drv.load(k.ptx, k.name)
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in inputs]
        scal = [ctypes.c_int32(int(v)) for _, v in k.scalars]
        outs = [ctypes.c_void_p(t.data_ptr()) for t in outputs]
        torch.cuda.synchronize()
        drv.launch(fn, k.grid, k.block, k.shared_mem, torch.cuda.current_stream().cuda_stream,
                   ptrs + scal + outs)
        torch.cuda.synchronize()
        return {"grid": list(k.grid), "block": k.block[0], "smem": k.shared_mem}

    for arch in archs if drv else []:
        for dt in dtypes:
            def aot_rms(arch=arch, dt=dt):
                shape = (2, 7, 4096)
                x, w = rms_inputs(shape, dt)
                y = torch.empty_like(x)
                info = run_ptx(kernels.rms_norm_launch(shape, kernels.TRITON_DTYPES[x.dtype], 1e-5), arch, (x, w), (y,))
                return {**_compare(y, rms_norm_reference(x, w, 1e-5), dt), **info}
            rep.check(f"ptx sm_{arch} rms_norm {dt}", aot_rms)
            for il in (True, False):
                def aot_rope(arch=arch, dt=dt, il=il):
                    shape = (3, 7, 8, 128)
                    x, c, s, st = rope_inputs(shape, dt)
                    y = torch.empty_like(x)
                    plan = kernels.rope_launch(shape, kernels.TRITON_DTYPES[x.dtype], il, c.shape[0])
                    info = run_ptx(plan, arch, (x, c, s, st), (y,))
                    return {**_compare(y, rope_reference(x, c, s, st, il), dt), **info}
                rep.check(f"ptx sm_{arch} rope {dt} {'interleaved' if il else 'rotate_half'}", aot_rope)

    # 3. Timing ------------------------------------------------------------------------------------
    def bench(fn, iters: int) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters * 1e3  # microseconds

    iters = 20 if args.quick else 100
    for dt in ("float16", "bfloat16"):
        def time_rms(dt=dt):
            x, w = rms_inputs((8, 512, 4096), dt)
            t_k, t_r = bench(lambda: kernels.rms_norm(x, w, 1e-5), iters), bench(lambda: rms_norm_reference(x, w, 1e-5), iters)
            return {"ok": True, "triton_us": f"{t_k:.1f}", "torch_us": f"{t_r:.1f}", "speedup": f"{t_r / t_k:.2f}"}
        rep.check(f"time rms_norm {dt} [8,512,4096]", time_rms)
        for il in (True, False):
            def time_rope(dt=dt, il=il):
                x, c, s, st = rope_inputs((8, 512, 32, 128), dt, table_rows=4096)
                t_k = bench(lambda: kernels.rope(x, c, s, st, il), iters)
                t_r = bench(lambda: rope_reference(x, c, s, st, il), iters)
                return {"ok": True, "triton_us": f"{t_k:.1f}", "torch_us": f"{t_r:.1f}", "speedup": f"{t_r / t_k:.2f}"}
            rep.check(f"time rope {dt} [8,512,32,128] {'interleaved' if il else 'rotate_half'}", time_rope)

    print(f"\n{len(rep.rows) - rep.failed}/{len(rep.rows)} checks passed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "time": time.time(), "rows": rep.rows}, f, indent=1)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
