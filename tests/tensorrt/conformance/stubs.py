"""Make the real TensorRT 11.4 Python package importable on a machine without NVIDIA's libraries.

The `tensorrt-cu13-bindings` wheel (a test dependency) holds the `tensorrt_bindings` package: its Python
code (`tensorrt.plugin` included) and the compiled module `tensorrt.so`, which links against
`libnvinfer.so.11`, `libnvonnxparser.so.11` and `libnvinfer_plugin.so.11`. Those come from the
`tensorrt-cu13-libs` wheel, which cannot be installed here. `prepare(dir)` writes into `dir`:

    lib/     stub libraries with those SONAMEs, compiled with gcc from C generated here. Each defines the
             C entry points the module needs and nothing in the process provides (found with `nm -D` on
             the module, so a new TensorRT release cannot silently need more); calling one prints its
             name and aborts, so nothing can mistake the stubs for TensorRT.
    site/    the `tensorrt` package exactly as the `tensorrt-cu13` metapackage installs it (its sdist needs
             the -libs wheel): `tensorrt` and `tensorrt.plugin` re-export `tensorrt_bindings`.

and returns the environment for a child process that imports them. Nothing here imports tensorrt: the
stubs exist only on that child's loader path, never in the test process or the product.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

DIST = "tensorrt-cu13-bindings"
VERSION = "11.4.0.106"  # pinned in pyproject.toml's test extra
LIBRARIES = ("libnvinfer.so.11", "libnvonnxparser.so.11", "libnvinfer_plugin.so.11")

# The metapackage's two forwarding modules (tensorrt_cu13-11.4.0.106.tar.gz, tensorrt/__init__.py and
# tensorrt/plugin/__init__.py, licence header omitted).
_FORWARDERS = {
    "tensorrt/__init__.py": "from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__\n",
    "tensorrt/plugin/__init__.py": "from tensorrt_bindings.plugin import *\n",
}


def installed_version() -> str | None:
    """Version of the installed bindings wheel, or None when it is not installed."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def compiled_module() -> Path:
    """Path of `tensorrt_bindings/tensorrt.so` (found without importing it)."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{DIST} is not installed")
    (found,) = Path(spec.submodule_search_locations[0]).glob("tensorrt*.so")
    return found


def needed_entry_points(module: Path) -> list[str]:
    """Undefined, non-weak, unversioned symbols of `module` that no library in this process defines."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True, text=True,
                         check=True).stdout
    here = ctypes.CDLL(None)  # the interpreter, libc and what they loaded
    needed = []
    for line in out.splitlines():
        kind, name = line.split()[-2:]
        if kind != "U" or "@" in name or hasattr(here, name):
            continue
        needed.append(name)
    return sorted(needed)


def library_for(symbol: str) -> str:
    """Which TensorRT library exports `symbol` (by NVIDIA's naming: parser and plugin entry points)."""
    if "OnnxParser" in symbol:
        return "libnvonnxparser.so.11"
    if "Plugins" in symbol:
        return "libnvinfer_plugin.so.11"
    return "libnvinfer.so.11"


def stub_source(symbols: list[str]) -> str:
    """C source defining each symbol as a function that reports the call and aborts."""
    lines = ["#include <stdio.h>", "#include <stdlib.h>", ""]
    for s in symbols:
        lines.append(f'void *{s}(void) {{ fprintf(stderr, "TensorRT stub: {s} called\\n"); abort(); }}')
    return "\n".join(lines) + "\n"


def prepare(root: Path) -> dict[str, str]:
    """Write the stub libraries and the `tensorrt` package under `root`; return the child's environment."""
    module = compiled_module()
    symbols = needed_entry_points(module)
    lib = root / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    for soname in LIBRARIES:
        src = lib / (soname.split(".so")[0] + ".c")
        src.write_text(stub_source([s for s in symbols if library_for(s) == soname]))
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib / soname), f"-Wl,-soname,{soname}", str(src)],
                       check=True, capture_output=True, text=True)
    site = root / "site"
    shutil.rmtree(site, ignore_errors=True)
    for rel, text in _FORWARDERS.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LD_LIBRARY_PATH")]))
    env["LLAMA_EXPORT_TRT_STUBS"] = str(lib)
    env["LLAMA_EXPORT_TRT_SITE"] = str(site)
    env["LLAMA_EXPORT_TRT_SYMBOLS"] = ",".join(symbols)
    return env
