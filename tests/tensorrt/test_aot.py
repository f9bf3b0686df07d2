"""AOT PTX compilation for sm_80/sm_90 (no GPU needed) and its agreement with the Python launch."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'llama_export[triton]')")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("AOT compilation needs real Triton kernels; unset TRITON_INTERPRET", allow_module_level=True)

import torch  # noqa: E402

from llama_export.backends.tensorrt import aot, kernels  # noqa: E402

PLANS = {
    "rms_norm-fp16": kernels.rms_norm_launch((2, 3, 96), "fp16", 1e-5),
    "rms_norm-bf16-4096": kernels.rms_norm_launch((2, 3, 4096), "bf16", 1e-6),
    "rope-fp32-interleaved": kernels.rope_launch((2, 3, 4, 128), "fp32", True),
    "rope-fp16-rotate_half": kernels.rope_launch((2, 3, 4, 64), "fp16", False),
}


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
    assert aot.count_entry_params(k.ptx, k.name) == k.n_params
    assert k.n_params == len(plan.inputs) + len(plan.scalars) + len(plan.outputs) + k.trailing_params
    assert k.shared_mem >= 0


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
        x, cs = torch.zeros(2, 3, 4, 64, dtype=torch.float16), torch.zeros(3, 32)
        monkeypatch.setitem(kernels.KERNELS, "rope_kernel", rec)
        kernels.rope(x, cs, cs, False)
        plan = kernels.rope_launch((2, 3, 4, 64), "fp16", False)
    (grid, args, kw), = rec.calls
    monkeypatch.undo()  # compile the real kernel
    k = aot.compile_plan(plan, arch=90)
    assert grid == k.grid
    assert kw.pop("num_warps") == k.num_warps and k.block == (k.num_warps * 32, 1, 1)
    assert kw == dict(plan.constexprs)
    n_in = k.n_inputs
    assert tuple(args[n_in:n_in + len(k.scalars)]) == tuple(v for _, v in k.scalars)
    assert len(args) == k.n_inputs + len(k.scalars) + k.n_outputs
    if which == "rope":
        assert k.scalars == (("seq", 3),) and grid == (2 * 3 * 4, 1, 1)


def test_symbolic_sizes_only_use_multiplication() -> None:
    class Sym:
        def __init__(self, s: str) -> None:
            self.s = s

        def __mul__(self, o):
            return Sym(f"({self.s}*{o.s if isinstance(o, Sym) else o})")

    plan = kernels.rope_launch((Sym("B"), Sym("S"), 4, 64), "fp16", True)
    assert plan.grid[0].s == "((B*S)*4)" and plan.scalars[0][1].s == "S"
    assert kernels.rms_norm_launch((Sym("B"), Sym("S"), 96), "fp32", 1e-5).grid[0].s == "(B*S)"
