"""Fixtures of the conformance suite (`check_*.py`), which runs in a child process prepared by stubs.py.

`tests/tensorrt/test_conformance.py` starts that process; run alone, these checks fail with a message
saying so. Nothing at import time touches tensorrt, so the normal test run can load this file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.tensorrt.conformance import fakes, stubs


@pytest.fixture(scope="session")
def trt_modules() -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin): the real 11.4 package, imported over the stub libraries.

    tensorrt.plugin derives one class from a C++ interface when it is imported (SymExprImpl from
    ISymExpr): that interface is the fake while it is imported; the module attribute is restored after
    and faked again only where expressions are (`expression_fakes`).
    """
    site = os.environ.get("LLAMA_EXPORT_TRT_SITE")
    if not site:
        pytest.fail("the conformance checks run in the process tests/tensorrt/test_conformance.py prepares")
    import tensorrt as trt
    import tensorrt_bindings

    assert Path(trt.__file__).is_relative_to(site), trt.__file__
    assert trt.__version__ == tensorrt_bindings.__version__ == stubs.VERSION
    real = trt.ISymExpr
    trt.ISymExpr = fakes.FakeSymExpr
    try:
        import tensorrt.plugin as trtp
    finally:
        trt.ISymExpr = real
    return trt, trtp


@pytest.fixture(scope="session")
def source_root() -> Path:
    """Where the llama_export under test was imported from (a mutated copy in the mutation tests)."""
    import llama_export

    root = Path(llama_export.__file__).resolve().parents[1]
    expected = os.environ.get("LLAMA_EXPORT_SOURCE_ROOT")
    assert expected is None or root == Path(expected).resolve(), f"imported {root}, expected {expected}"
    return root


@pytest.fixture(scope="session")
def registry(trt_modules: tuple[Any, Any]) -> Any:
    """The plugin registry tensorrt.plugin registers into (`trt.get_plugin_registry()`), faked."""
    trt, _ = trt_modules
    reg = fakes.FakePluginRegistry()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt, "get_plugin_registry", lambda: reg)
        yield reg


@pytest.fixture(scope="module")
def expression_fakes(trt_modules: tuple[Any, Any]) -> None:
    """Shape expressions are C++ objects: tensorrt.plugin checks and builds them through these names."""
    trt, _ = trt_modules
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt, "IDimensionExpr", fakes.FakeDimensionExpr)
        mp.setattr(trt, "DimsExprs", fakes.FakeDimsExprs)
        mp.setattr(trt, "ISymExpr", fakes.FakeSymExpr)
        yield
