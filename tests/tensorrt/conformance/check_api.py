"""Every tensorrt / tensorrt.plugin name llama_export uses exists in TensorRT 11.4 with a matching signature;
the fakes used by check_plugins.py only have names the real C++ classes have."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from tests.tensorrt.conformance import api_usage, fakes


def test_every_tensorrt_use_exists_with_a_matching_signature(trt_modules: tuple[Any, Any], source_root: Path) -> None:
    trt, trtp = trt_modules
    files = sorted((source_root / "llama_export").rglob("*.py"))
    report = api_usage.check_sources(files, trt, trtp)
    assert not report.problems, "\n".join(report.problems)
    # The inference reached the build, the runner and the plugins (a checker that sees nothing passes).
    owners = {owner for owner, _ in report.uses}
    for needed in ("tensorrt.IBuilderConfig", "tensorrt.IExecutionContext", "tensorrt.ICudaEngine",
                   "tensorrt.plugin", "tensorrt.plugin.TensorDesc", "tensorrt.plugin.KernelLaunchParams"):
        assert needed in owners, f"no use of {needed} found; the checker lost track of it"


def test_dtype_names_are_tensorrt_data_types(trt_modules: tuple[Any, Any]) -> None:
    """The backend looks TensorRT dtypes up by `dtypes` names (`getattr(trt, d.name, None)`, the checker's
    `dynamic` uses): the kernels' float types must all be there, and every name found is a DataType."""
    from llama_export import dtypes

    trt, _ = trt_modules
    for d in dtypes.DTYPES:
        found = getattr(trt, d.name, None)
        assert found is None or isinstance(found, trt.DataType), d.name
        if d.precision is not None:
            assert found is not None, f"tensorrt has no {d.name}"
    assert {getattr(trt, d.name).name for d in dtypes.FLOAT_TYPES if d.precision} == {"FLOAT", "HALF", "BF16"}


def test_the_checker_catches_what_it_claims(trt_modules: tuple[Any, Any], tmp_path: Path) -> None:
    trt, trtp = trt_modules
    src = tmp_path / "wrong.py"
    src.write_text(
        "def f(trt, config: trt.IBuilderConfig, cache):\n"
        "    config.set_timing_cache(cache, ignore_mismatch=False)\n"       # right
        "    config.set_timing_cache(cache, ignore_mismatches=False)\n"     # keyword
        "    config.set_timing_cache(cache)\n"                              # missing argument
        "    config.set_flag(trt.BuilderFlag.REFITS)\n"                     # enum member
        "    config.set_flag(trt.MemoryPoolType.WORKSPACE)\n"               # argument type
        "    trt.OnnxParsr\n"                                               # module attribute
        "    getattr(trt.BuilderFlag, name)\n"                              # unchecked
        "    getattr(trt, name, None)\n"                                    # tolerant: listed, not judged
    )
    report = api_usage.check_sources([src], trt, trtp)
    assert [p.split(":")[1] for p in report.problems] == ["3", "4", "5", "6", "7", "8"], "\n".join(report.problems)
    assert report.dynamic == ["wrong.py:9"]


def _public(fake: type) -> set[str]:
    names = {n for n in vars(fake) if not n.startswith("_") and n != "REAL"}
    try:
        names |= {n for n in vars(fake()) if not n.startswith("_")}
    except TypeError:
        pass
    return names


def _same_parameters(overload: api_usage.Overload, ours: list[str]) -> bool:
    """Same count, and the same names where TensorRT names them (argN is positional-only)."""
    theirs = [p[0] for p in overload.params]
    return len(theirs) == len(ours) and all(re.fullmatch(r"arg\d+", t) or t == o for t, o in zip(theirs, ours))


@pytest.mark.parametrize("fake", fakes.FAKES, ids=lambda f: f.__name__)
def test_fakes_mirror_the_real_classes(trt_modules: tuple[Any, Any], fake: type) -> None:
    import tensorrt_bindings.tensorrt as compiled  # the real classes, whatever a test patched

    real = getattr(compiled, fake.REAL)
    for name in _public(fake):
        assert hasattr(real, name), f"{fake.__name__}.{name}: {fake.REAL} has no {name}"
        member = getattr(fake, name, None)
        if inspect.isfunction(member):
            overloads = api_usage.pybind_overloads(getattr(real, name), name, method=True)
            ours = list(inspect.signature(member).parameters)[1:]
            assert overloads and any(_same_parameters(o, ours) for o in overloads), (
                f"{fake.__name__}.{name}{tuple(ours)} matches no {fake.REAL}.{name} overload")
    if "__setitem__" in vars(fake):
        assert hasattr(real, "__setitem__")
