"""Triton kernels vs the torch references, on CPU through Triton's interpreter (in a subprocess): RMSNorm,
and RoPE (contract v2: full tables, ragged per-row `start`) in both layouts, fp32 and fp16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tensorrt._interpret_worker import CASES, case_id

pytest.importorskip("triton", reason="triton is not installed (pip install 'llama_export[triton]')")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict[str, float]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.tensorrt._interpret_worker"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference(interpreted_results, case) -> None:
    r = interpreted_results[case_id(case)]
    assert r["dtype_ok"]
    # ratio = max |got - want| / (tol + tol * |want|); <= 1 means within atol = rtol = tol
    assert r["ratio"] <= 1.0, f"{case_id(case)}: max abs error {r['max_abs']:.3g}"


def test_rope_positions_outside_the_table_are_nan_not_read(interpreted_results) -> None:
    r = interpreted_results["rope-outside-table"]
    assert r == {"match": True, "nan_tokens": 1}


def test_kernels_in_this_process_stay_compilable(interpreted_results) -> None:
    """The interpreter ran in a subprocess: the kernels imported here are still real JIT functions,
    so ahead-of-time compilation (which the interpreter's functions cannot do) works after it."""
    from llama_export.backends.tensorrt import aot, kernels

    assert all(hasattr(fn, "arg_names") for fn in kernels.KERNELS.values())
    k = aot.compile_plan(kernels.rms_norm_launch((2, 64), "fp32", 1e-5), arch=80)
    assert k.ptx.startswith("//") and ".entry" in k.ptx
