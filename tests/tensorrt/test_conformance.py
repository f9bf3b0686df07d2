"""The TensorRT backend against the real TensorRT 11.4 Python package (tensorrt-cu13-bindings), on CPU.

The package imports over stub C libraries (conformance/stubs.py) in a child process that runs the
checks in conformance/check_*.py; this process never imports tensorrt, so the product still sees no
TensorRT here. The mutation tests show the checks fail on a wrong API name, keyword, enum member or
plugin signature. Skipped, with that one reason, only when the bindings wheel is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tensorrt.conformance import stubs

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ROOT / "tests" / "tensorrt" / "conformance"

_installed = stubs.installed_version()
pytestmark = pytest.mark.skipif(
    _installed is None, reason=f"{stubs.DIST}=={stubs.VERSION} is not installed (pip install -e '.[test]')"
)


@pytest.fixture(scope="module")
def trt_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    assert _installed == stubs.VERSION, f"{stubs.DIST} {_installed} installed; the checks are for {stubs.VERSION}"
    return stubs.prepare(tmp_path_factory.mktemp("tensorrt"))


def run_checks(env: dict[str, str], source_root: Path, *selection: str) -> subprocess.CompletedProcess[str]:
    """Run check_*.py (or `selection`, pytest node ids relative to CHECKS) with llama_export from `source_root`."""
    targets = [str(CHECKS / s) for s in selection] or sorted(str(p) for p in CHECKS.glob("check_*.py"))
    env = {**env, "PYTHONPATH": os.pathsep.join([str(source_root), env["LLAMA_EXPORT_TRT_SITE"], str(ROOT)]),
           "LLAMA_EXPORT_SOURCE_ROOT": str(source_root), "TRITON_DEFAULT_FP_FUSION": "1"}
    # --import-mode=append: the tests' rootdir must not shadow a mutated llama_export on sys.path.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append", "-rfEs", *targets]
    return subprocess.run(cmd, cwd=source_root, env=env, capture_output=True, text=True, timeout=540)


def _summary(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout + proc.stderr)[-6000:]


def test_stub_libraries_are_generated_from_the_module(trt_env: dict[str, str]) -> None:
    """The stubs define the module's missing entry points; nothing in this process imported tensorrt."""
    symbols = trt_env["LLAMA_EXPORT_TRT_SYMBOLS"].split(",")
    assert "createInferBuilder_INTERNAL" in symbols and "getPluginRegistry" in symbols
    lib = Path(trt_env["LLAMA_EXPORT_TRT_STUBS"])
    assert sorted(p.name for p in lib.glob("*.so.11")) == sorted(stubs.LIBRARIES)
    assert "tensorrt" not in sys.modules and "tensorrt_bindings" not in sys.modules


def test_calling_a_stub_aborts(trt_env: dict[str, str]) -> None:
    env = {**trt_env, "PYTHONPATH": trt_env["LLAMA_EXPORT_TRT_SITE"]}
    proc = subprocess.run([sys.executable, "-c", "import tensorrt as t; t.Builder(t.Logger())"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TensorRT stub: createInferBuilder_INTERNAL called" in proc.stderr


def test_conformance_checks_pass(trt_env: dict[str, str]) -> None:
    proc = run_checks(trt_env, ROOT)
    assert proc.returncode == 0, _summary(proc)
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout))
    assert counts.get("passed", 0) >= 10 and set(counts) == {"passed"}, _summary(proc)


# name -> ([(file, original text, mutated text, what the failure must name)], checks to run). The API
# mistakes share one mutated copy: the API check reports every problem it finds in one run.
MUTATIONS = {
    "api-name-keyword-enum": ([
        ("build.py", "if config.set_timing_cache(self.timing_cache, ignore_mismatch=False):",
         "if config.set_timing_caches(self.timing_cache, ignore_mismatch=False):",
         "IBuilderConfig has no attribute 'set_timing_caches'"),
        ("build.py", "if not config.set_timing_cache(self.timing_cache, ignore_mismatch=False):",
         "if not config.set_timing_cache(self.timing_cache, ignore_mismatches=False):",
         "has no keyword 'ignore_mismatches'"),
        ("build.py", "F.PREFER_AOT_PYTHON_PLUGINS", "F.PREFER_AOT_PLUGINS",
         "NetworkDefinitionCreationFlag has no attribute 'PREFER_AOT_PLUGINS'"),
    ], "check_api.py"),
    "plugin-parameter": ([
        ("plugins.py", "outputs: tuple[trtp.TensorDesc], tactic: int\n    )",
         "outputs: tuple[trtp.TensorDesc], tactics: int\n    )",
         "Unexpected attribute 'tactics' specified in aot_impl function"),
    ], "check_plugins.py::test_registration_completes_after_a_failed_attempt"),
    # The bug tensorrt.plugin 11.4 found first: an aot_impl without its return annotation.
    "plugin-return": ([
        ("plugins.py", "    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:", "    ):",
         "No return annotation found for aot_impl function"),
    ], "check_plugins.py::test_registration_completes_after_a_failed_attempt"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_checks_fail_on_a_wrong_use(name: str, trt_env: dict[str, str], tmp_path: Path) -> None:
    edits, checks = MUTATIONS[name]
    shutil.copytree(ROOT / "llama_export", tmp_path / "llama_export", ignore=shutil.ignore_patterns("__pycache__"))
    for file, old, new, _ in edits:
        target = tmp_path / "llama_export" / "backends" / "tensorrt" / file
        text = target.read_text()
        assert old in text, f"mutation {name} no longer applies to {file}: {old!r}"
        target.write_text(text.replace(old, new, 1))
    proc = run_checks(trt_env, tmp_path, checks)
    assert proc.returncode == 1, _summary(proc)
    for *_, message in edits:
        assert message in proc.stdout, _summary(proc)
