"""AOT PTX compilation for sm_80/sm_90 (no GPU needed) and its agreement with the Python launch."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'llama_export[triton]')")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("AOT compilation needs real Triton kernels; unset TRITON_INTERPRET", allow_module_level=True)

import torch  # noqa: E402

from llama_export.backends.tensorrt import aot, kernels  # noqa: E402

# The parameters TensorRT's AOT launcher passes, in order: input pointers, int32 extra args, output
# pointers (tensorrt.plugin.aot_impl). RMSNorm(x, weight) -> y; RoPE(x, cos, sin, start) -> y with the
# sequence length S and the table rows P as its extra args. Written out here, not derived from the launch
# plans under test.
TENSORRT_LAUNCH = {
    "rms_norm_kernel": [".u64", ".u64", ".u64"],
    "rope_kernel": [".u64", ".u64", ".u64", ".u64", ".u32", ".u32", ".u64"],
}

PLANS = {
    "rms_norm-fp16": kernels.rms_norm_launch((2, 3, 96), "fp16", 1e-5),
    "rms_norm-bf16-4096": kernels.rms_norm_launch((2, 3, 4096), "bf16", 1e-6),
    "rope-fp32-interleaved": kernels.rope_launch((2, 3, 4, 128), "fp32", True, 64),
    "rope-fp16-rotate_half": kernels.rope_launch((2, 3, 4, 64), "fp16", False, 64),
    "rope-bf16-interleaved": kernels.rope_launch((2, 3, 8, 128), "bf16", True, 4096),
}


def expected_shared_mem(plan: kernels.LaunchPlan) -> int:
    """The dynamic shared memory a kernel needs, from its launch configuration: RoPE is elementwise
    (none); RMSNorm's one `tl.sum` over a row reduces within a warp by shuffles and, when the plan
    launches W > 1 warps, across them through one fp32 partial per warp (4·W bytes)."""
    if plan.kernel == "rope_kernel":
        return 0
    return 0 if plan.num_warps == 1 else 4 * plan.num_warps


@pytest.mark.parametrize("arch", aot.ARCHS)
@pytest.mark.parametrize("name", list(PLANS))
def test_compiles_to_ptx_for_target(name: str, arch: int) -> None:
    plan = PLANS[name]
    k = aot.compile_plan(plan, arch=arch)
    assert f".target sm_{arch}" in k.ptx
    assert f".entry {k.name}(" in k.ptx and k.name == plan.kernel
    # The PTX requires exactly the block the plan launches with.
    assert aot.reqntid(k.ptx) == plan.block[0] == k.num_warps * 32
    assert k.grid == plan.grid and k.scalars == plan.scalars
    assert [t for t, _ in aot.entry_params(k.ptx, k.name)] == TENSORRT_LAUNCH[k.name]
    assert len(k.dropped_params) == 2  # Triton 3.9's global and profile scratch pointers
    assert all(n not in k.ptx for n in k.dropped_params)
    assert ".version 8.8" in k.ptx
    # What TensorRT is told to allocate: what the kernel needs, and shared memory it really uses.
    assert k.shared_mem == expected_shared_mem(plan), (k.shared_mem, plan.num_warps)
    assert ("st.shared" in k.ptx) == (k.shared_mem > 0)


@pytest.mark.parametrize("arch", aot.ARCHS)
@pytest.mark.parametrize("name", ["rms_norm-bf16-4096", "rope-fp32-interleaved", "rope-bf16-interleaved"])
def test_rewritten_ptx_assembles(name: str, arch: int, tmp_path: Path) -> None:
    """The PTX with its trailing parameters removed is valid: the ptxas Triton itself uses accepts it."""
    from triton.backends.nvidia.compiler import get_ptxas

    k = aot.compile_plan(PLANS[name], arch=arch)
    target = re.search(r"\.target\s+(\w+)", k.ptx).group(1)  # sm_80, sm_90a
    (tmp_path / "k.ptx").write_text(k.ptx)
    proc = subprocess.run([get_ptxas(arch).path, f"--gpu-name={target}", "k.ptx", "-o", "k.cubin"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


_PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u32 k_param_1,
	.param .u64 .ptr .global .align 1 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b32 	%r1, [k_param_1];
	// k_param_30 is another name
	ret;
}
"""


def test_drop_unused_params_removes_only_the_declarations() -> None:
    ptx, dropped = aot.drop_unused_params(_PTX, "k", keep=2)
    assert dropped == ("k_param_2", "k_param_3")
    assert aot.entry_params(ptx, "k") == [(".u64", "k_param_0"), (".u32", "k_param_1")]
    assert ptx.split(")", 1)[1] == _PTX.split(")", 1)[1]  # the body is untouched


def test_drop_unused_params_refuses_a_used_parameter() -> None:
    used = _PTX.replace("\tret;", "\tld.param.b64 \t%rd2, [k_param_3];\n\tret;")
    with pytest.raises(ValueError, match="k_param_3"):
        aot.drop_unused_params(used, "k", keep=2)
    with pytest.raises(ValueError, match="fewer"):
        aot.drop_unused_params(_PTX, "k", keep=5)


def test_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        aot.compile_plan(PLANS["rms_norm-fp16"], arch=70)


class _Recorder:
    """Stands in for a Triton kernel: records what `kernels.launch` passes."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


@pytest.mark.parametrize("which", ["rms_norm", "rope"])
def test_python_launch_equals_aot_description(monkeypatch, which: str) -> None:
    rec = _Recorder()
    if which == "rms_norm":
        x, w = torch.zeros(2, 3, 96, dtype=torch.float16), torch.ones(96, dtype=torch.float16)
        monkeypatch.setitem(kernels.KERNELS, "rms_norm_kernel", rec)
        kernels.rms_norm(x, w, 1e-5)
        plan = kernels.rms_norm_launch((2, 3, 96), "fp16", 1e-5)
    else:
        x, cs = torch.zeros(2, 3, 4, 64, dtype=torch.float16), torch.zeros(10, 32)
        monkeypatch.setitem(kernels.KERNELS, "rope_kernel", rec)
        kernels.rope(x, cs, cs, torch.tensor([0, 7]), False)
        plan = kernels.rope_launch((2, 3, 4, 64), "fp16", False, 10)
    (grid, args, kw), = rec.calls
    monkeypatch.undo()  # compile the real kernel
    k = aot.compile_plan(plan, arch=90)
    assert grid == k.grid
    assert kw.pop("num_warps") == k.num_warps and k.block == (k.num_warps * 32, 1, 1)
    assert kw == dict(plan.constexprs)
    n_in = k.n_inputs
    assert tuple(args[n_in:n_in + len(k.scalars)]) == tuple(v for _, v in k.scalars)
    assert len(args) == k.n_inputs + len(k.scalars) + k.n_outputs == len(aot.entry_params(k.ptx, k.name))
    if which == "rope":
        assert k.scalars == (("seq", 3), ("n_pos", 10)) and grid == (2 * 3 * 4, 1, 1)
        assert args[3].dtype == torch.int64 and args[3].tolist() == [0, 7]  # start, the 4th pointer


def test_symbolic_sizes_only_use_multiplication() -> None:
    class Sym:
        def __init__(self, s: str) -> None:
            self.s = s

        def __mul__(self, o):
            return Sym(f"({self.s}*{o.s if isinstance(o, Sym) else o})")

    plan = kernels.rope_launch((Sym("B"), Sym("S"), 4, 64), "fp16", True, Sym("P"))
    assert plan.grid[0].s == "((B*S)*4)" and [v.s for _, v in plan.scalars] == ["S", "P"]
    assert kernels.rms_norm_launch((Sym("B"), Sym("S"), 96), "fp32", 1e-5).grid[0].s == "(B*S)"


def test_rope_rejects_a_wrong_start() -> None:
    x, cs = torch.zeros(2, 3, 4, 64), torch.zeros(10, 32)
    with pytest.raises(ValueError, match=r"start \[2\] int64"):
        kernels.rope(x, cs, cs, torch.tensor([0, 7], dtype=torch.int32), True)
    with pytest.raises(ValueError, match="cos/sin"):
        kernels.rope(x, cs[:, :16], cs[:, :16], torch.tensor([0, 7]), True)
