"""The tolerance tables cover every precision and keep their documented order."""

from __future__ import annotations

import pytest

from llama_export.config import Precision
from llama_export.dtypes import FLOAT_TYPES
from llama_export.tolerances import CROSS_DTYPE_LOGITS_ATOL, KERNEL_TOLERANCES, TOLERANCES, kernel_tolerance


@pytest.mark.parametrize("precision", list(Precision))
def test_every_precision_has_every_tolerance(precision: Precision) -> None:
    assert TOLERANCES[precision].logits_atol > 0 and KERNEL_TOLERANCES[precision] > 0
    # against CPU fp32 the dtype's own rounding counts too: never tighter than the same-dtype bound
    assert CROSS_DTYPE_LOGITS_ATOL[precision] >= TOLERANCES[precision].logits_atol


def test_kernel_tolerance_by_dtype_name() -> None:
    names = {d.name: Precision(d.precision) for d in FLOAT_TYPES if d.precision}
    assert set(names) == {"float32", "float16", "bfloat16"}
    assert all(kernel_tolerance(n) == KERNEL_TOLERANCES[p] for n, p in names.items())
    # fewer mantissa bits, a looser bound
    assert kernel_tolerance("float32") < kernel_tolerance("float16") < kernel_tolerance("bfloat16")
