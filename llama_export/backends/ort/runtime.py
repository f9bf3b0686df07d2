"""What the installed onnxruntime can run: the oldest version the backend supports, and whether its
`GroupQueryAttention` takes the input the written lowering uses.

Versions run by the tests: onnxruntime 1.32.0 (CPU, the pinned dependency) and onnxruntime-gpu 1.31.1
(the newest onnxruntime-gpu, run on its CPU provider in CI: `.ci/run`). Their GQA schemas differ:

    1.32   17 inputs, the last `query_seqlens` (right-padded query chunks)  ─► the fused lowering
    1.31   16 inputs                                                       ─► attention unfused

1.31 cannot take the fused graph and no 16-input form runs every step of the contract
(`lowering.GQA_INPUTS`), so on 1.31 the backend lowers each segment in memory without the fusion
instead of opening the written `*.ort.onnx` (which is written for 1.32 at export time). Nothing older
than 1.31 has been tried; it is refused with one line.
"""

from __future__ import annotations

import functools
from typing import Any

from llama_export.errors import BackendUnavailableError

MIN_VERSION = (1, 31)
GQA_INPUTS = 17  # GroupQueryAttention's input count in the fused lowering (input 16: query_seqlens)


def _version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string like "1.31.1" or "1.32.0.dev20261101"."""
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_version(ort: Any) -> None:
    """BackendUnavailableError (one line: the version found, what to install) for a runtime older than
    MIN_VERSION."""
    found = _version(ort.__version__)
    if found < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise BackendUnavailableError(
            f"onnxruntime {ort.__version__} is older than {need}, the oldest the ort backend runs on; "
            f"pip install -U 'onnxruntime>={need}' (or 'onnxruntime-gpu>={need}' for --device cuda)")


@functools.lru_cache(maxsize=None)
def _gqa_input_count(version: str) -> int:
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    if not hasattr(C, "get_all_operator_schema"):  # a build without schemas: go by the version
        return GQA_INPUTS if _version(version) >= (1, 32) else 0
    return max((len(s.inputs) for s in C.get_all_operator_schema()
                if s.name == "GroupQueryAttention" and s.domain == "com.microsoft"), default=0)


def fused_attention(ort: Any) -> bool:
    """Whether this onnxruntime's GroupQueryAttention takes the fused lowering's inputs (read from the
    runtime's own schema: `query_seqlens` arrived in 1.32)."""
    return _gqa_input_count(ort.__version__) >= GQA_INPUTS
