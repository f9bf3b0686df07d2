"""The prepared GPU check script: it parses its arguments and says "no GPU" cleanly on CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check_trt.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_trt", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_args() -> None:
    a = _load().parse_args(["--quick", "--json", "r.json"])
    assert a.quick and a.json == "r.json"


def test_report_catches_failures() -> None:
    rep = _load().Report()
    rep.check("ok", lambda: {"ok": True})
    rep.check("boom", lambda: 1 / 0)
    assert rep.failed == 1 and "ZeroDivisionError" in rep.rows[1]["error"]


def test_no_gpu_message() -> None:
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this runs (and means the same) on a GPU machine too.
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and "no GPU" in out.stdout
