"""scripts/device_check.py, the one-command GPU check, on a CPU: what it says without a GPU, its line
format and failure counting, the checks that run on the CPU (--cpu), and that the refusal line it waits
for is the product's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from llama_export.runner import devices
from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "device_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_it_says_so_and_exits_2():
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this means the same on a GPU machine
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("SKIP  device") and "no GPU" in r.stdout


def test_one_line_per_check_and_failures_counted(tmp_path):
    dc = _load()
    rep = dc.Report(log=tmp_path / "log")
    rep.run("fine", lambda: ("PASS", "1.0e-05\n  over two lines"))
    rep.run("broken", lambda: 1 / 0)
    rep.run("absent", lambda: ("SKIP", "no such thing"))
    assert rep.failed == 1
    assert [line.split()[:2] for line in rep.lines] == [["PASS", "fine"], ["FAIL", "broken"], ["SKIP", "absent"]]
    assert "ZeroDivisionError" in rep.lines[1] and all("\n" not in line for line in rep.lines)
    assert (tmp_path / "log").read_text().splitlines() == rep.lines


def test_the_eager_checks_pass_on_the_cpu():
    dc = _load()
    rep = dc.Report()
    dc.eager_checks(rep, "cpu")
    assert [line.split()[:2] for line in rep.lines] == [["PASS", f"eager-{d}"] for d in ("fp32", "fp16", "bf16")]


def test_the_refusal_it_waits_for_is_the_products(monkeypatch):
    monkeypatch.setattr(devices, "_gpus", lambda: 1)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Exception) as e:
        devices.check_gpus_for_ranks("cuda", 2)
    assert _load().ONE_GPU_LINE in str(e.value)


@pytest.mark.slow
def test_cpu_run_passes_what_runs_on_a_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--log", str(tmp_path / "log")], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr
    status = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines() if line.split()[0] != "INFO"}
    assert status["ort-cpu-fp16"] == status["ort-cpu-fp32"] == "PASS" and status["all"] == "PASS"
    assert status["tensorrt"] == status["tp2-refused"] == "SKIP"
