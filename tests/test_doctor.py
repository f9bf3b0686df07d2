"""`llama-export doctor` on this CPU machine, its GPU branches with torch.cuda and onnxruntime mocked, and
the one line a run prints when no ONNX Runtime is installed."""

from __future__ import annotations

import sys
import types

import onnxruntime
import pytest
import torch

from llama_export import cli
from llama_export.backends import doctor
from llama_export.backends.ort import runtime
from llama_export.errors import BackendUnavailableError
from tests.helpers import run_cli, tiny_export

NO_ORT = "neither onnxruntime nor onnxruntime-gpu is installed"


def _by_name(checks):
    out = {}
    for c in checks:
        out.setdefault(c.name, []).append(c)
    return out


def test_doctor_on_this_machine_exits_0_and_names_what_is_installed():
    r = run_cli("doctor", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if len(line.split()) > 1 and line[:1] != " "}
    assert lines["python"].startswith("ok") and sys.version.split()[0] in lines["python"]
    assert lines["torch"].startswith("ok") and torch.__version__ in lines["torch"]
    assert lines["onnxruntime"].split()[0] in ("ok", "warn") and onnxruntime.__version__ in lines["onnxruntime"]
    assert lines["ort-cpu"].startswith("ok") and "the session uses ['CPUExecutionProvider']" in lines["ort-cpu"]
    for name in ("nccl", "tensorrt", "triton"):
        assert name in lines, r.stdout
    if torch.version.cuda is None:  # this CPU machine: each missing GPU piece says what to do
        assert lines["gpus"].startswith("missing") and "pip install -e '.[gpu]'" in lines["gpus"]
    assert r.stdout.rstrip().endswith("the CPU path works")


def _fake_cuda(monkeypatch, capabilities):
    props = types.SimpleNamespace(total_memory=80 << 30)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU-{i}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)


def test_gpus_compute_capability_and_nccl_with_cuda_mocked(monkeypatch):
    _fake_cuda(monkeypatch, [(9, 0), (7, 5)])
    checks = _by_name(doctor.check_torch())
    assert checks["torch"][0].detail.endswith("(CUDA 13.0 build)")
    h100, old = checks["gpu"]
    assert h100.status == "ok" and "cuda:0 GPU-0, compute capability 9.0, 80.0 GiB" in h100.detail
    assert old.status == "warn" and "compute capability 7.5" in old.detail and "fp16" in old.fix
    assert checks["nccl"][0].status == "ok"
    assert "gpus" not in checks


def test_a_cuda_torch_that_sees_no_gpu_says_where_to_look(monkeypatch):
    _fake_cuda(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpus = _by_name(doctor.check_torch())["gpus"][0]
    assert gpus.status == "missing" and "nvidia-smi" in gpus.fix


class _FakeSession:
    """An InferenceSession whose CUDA provider did not load: it runs on the CPU only."""

    def __init__(self, model, providers):
        self.asked = providers

    def run(self, outputs, feeds):
        return [feeds["x"] * 2]

    def get_providers(self):
        return ["CPUExecutionProvider"]


def _fake_ort(monkeypatch, providers):
    fake = types.SimpleNamespace(__version__="1.31.1", get_available_providers=lambda: providers,
                                 InferenceSession=_FakeSession)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setattr(runtime, "fused_attention", lambda ort: True)


def test_a_cuda_provider_that_falls_back_to_the_cpu_is_reported(monkeypatch):
    _fake_ort(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    checks = _by_name(doctor.check_onnxruntime(want_cuda=True))
    assert checks["ort-cpu"][0].status == "ok"
    cuda = checks["ort-cuda"][0]
    assert cuda.status == "missing"
    assert "asked ['CUDAExecutionProvider', 'CPUExecutionProvider'], the session uses ['CPUExecutionProvider']" \
        in cuda.detail and "did not load" in cuda.detail and cuda.fix


def test_gpus_without_onnxruntime_gpu_say_to_install_it(monkeypatch):
    _fake_ort(monkeypatch, ["CPUExecutionProvider"])
    cuda = _by_name(doctor.check_onnxruntime(want_cuda=True))["ort-cuda"][0]
    assert cuda.status == "missing" and "onnxruntime-gpu" in cuda.detail and ".[gpu]" in cuda.detail


def test_without_onnxruntime_the_cpu_path_fails_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    from llama_export.backends.ort import import_onnxruntime

    with pytest.raises(BackendUnavailableError, match=NO_ORT):
        import_onnxruntime()
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("missing onnxruntime") and NO_ORT in line for line in out.splitlines()), out
    assert "the CPU path does not work" in out


@pytest.mark.slow
def test_a_run_without_any_onnxruntime_says_so_in_one_line(tmp_path):
    _, graphs = tiny_export(tmp_path, seed=0, tp=1)
    blocker = tmp_path / "blocker" / "onnxruntime"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    from tests.helpers import REPO

    r = run_cli("run", "--backend", "ort", "--artifacts", str(graphs), "--prompt-ids", "1,2",
                "--max-new-tokens", "1", env={"PYTHONPATH": f"{REPO}:{blocker.parent}"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {NO_ORT}: pip install -e '.[cpu]' (CPU), or '.[gpu]' "
                                             "beside a CUDA torch"]


def test_a_run_refuses_a_session_that_dropped_the_cuda_provider():
    from llama_export.backends.ort import check_providers_used

    asked = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match="could not use CUDAExecutionProvider .*runs on CPUExecutionProvider"):
        check_providers_used(_FakeSession(b"", asked), asked)
    check_providers_used(_FakeSession(b"", ["CPUExecutionProvider"]), ["CPUExecutionProvider"])
