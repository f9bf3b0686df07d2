"""Pure parts of the engine build (manifest assembly, CLI hooks) and the TensorRT-only paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from llama_export.backends.tensorrt import build, profiles, structure
from llama_export.config import ModelConfig, Precision
from llama_export.errors import ArtifactError, BackendUnavailableError
from llama_export.artifact.manifest import Manifest, RankEntry, Segment, TensorSpec, sha256_file
from tests.helpers import run_cli
from tests.tensorrt.graphs import attention_like_segment

try:  # the bindings can be installed yet fail to load libnvinfer: only an import tells
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except (ImportError, OSError):
    HAVE_TRT = False
HAVE_CUDA = False
try:
    import torch

    HAVE_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass
needs_trt = pytest.mark.skipif(
    not (HAVE_TRT and HAVE_CUDA),
    reason=f"needs TensorRT 11 (installed: {HAVE_TRT}) and a CUDA GPU (available: {HAVE_CUDA})",
)
ROOT = Path(__file__).resolve().parents[2]


def _export_dir(tmp_path: Path, n_layers: int = 3) -> tuple[Path, Manifest]:
    """An export directory of layer segments built by hand (no exporter needed)."""
    specs_in = (TensorSpec("x", "float16", ("batch", "seq", 8)), TensorSpec("cos", "float32", (16, 2)),
                TensorSpec("sin", "float32", (16, 2)), TensorSpec("start", "int64", ("batch",)))
    specs_out = (TensorSpec("y", "float16", ("batch", "seq", 2, 4)),)
    segs = []
    (tmp_path / "rank0").mkdir()
    for layer in range(n_layers):
        rel = f"rank0/layer{layer}.onnx"
        onnx.save(attention_like_segment(layer, seed=layer), str(tmp_path / rel))
        segs.append(Segment(f"layer{layer}", rel, sha256_file(tmp_path / rel), "attention", layer,
                            specs_in, specs_out, None))
    m = Manifest(model_name="tiny", variant="tp1-fp16", model=ModelConfig(8, n_layers, 2, 2, 32, 16, max_seq_len=16),
                 tp=1, dtype=Precision.FP16, opset=21, ir_version=10, max_batch=2,
                 ranks=(RankEntry(0, tuple(segs)),), inputs=("x",), outputs=("y",), exporter_version="test")
    (tmp_path / "manifest.json").write_text(m.to_json())
    return tmp_path, m


def test_assemble_build_manifest(tmp_path: Path) -> None:
    _, m = _export_dir(tmp_path)
    seg0, seg1 = m.ranks[0].segments[:2]
    key = structure.structure_key(attention_like_segment(0, seed=0))
    profs = {s.name: tuple(build.ProfileRecord.of(p) for p in profiles.plan_profiles(s.inputs, max_batch=2, max_seq_len=16))
             for s in (seg0, seg1)}
    recs = [
        build.EngineRecord(0, seg0.name, seg0.sha256, "rank0/layer0.plan", "a" * 64, key, None, {"x": "x"}, profs[seg0.name]),
        build.EngineRecord(0, seg1.name, seg1.sha256, "rank0/layer1.plan", "b" * 64, key, "rank0/layer0", {"x": "x"},
                           profs[seg1.name]),
    ]
    doc = build.assemble_build_manifest(m, recs, tensorrt_version="11.0.0", gpu_name="NVIDIA H100",
                                        compute_capability=(9, 0), plugins="aot")
    raw = json.loads(doc.to_json())
    assert raw["format"] == build.BUILD_FORMAT and raw["tensorrt_version"] == "11.0.0" and raw["dtype"] == "fp16"
    assert raw["gpu"] == {"name": "NVIDIA H100", "compute_capability": "9.0"}
    assert (raw["engines_built"], raw["engines_refit"]) == (1, 1)
    e0, e1 = raw["engines"]
    assert e0["onnx_sha256"] == seg0.sha256 and e1["refit_from"] == "rank0/layer0" and e0["refit_from"] is None
    assert [p["name"] for p in e1["profiles"]] == ["prefill", "decode"]
    assert e1["profiles"][1]["shapes"]["x"] == {"min": [1, 1, 8], "opt": [2, 1, 8], "max": [2, 1, 8]}
    # the runner reads it back through the same schema, to the same value
    back = build.BuildManifest.from_json(doc.to_json(), source="build_manifest.json")
    assert back == doc and back.engines[1].profiles[1].profile().shapes["x"][2] == (2, 1, 8)


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not a llama_export TensorRT build manifest of format version 1"),
    ({"plugins": "both"}, "plugins"),
    ({"tp": 0}, "tp"),
])
def test_a_wrong_build_manifest_is_one_error(tmp_path: Path, change: dict, message: str) -> None:
    _, m = _export_dir(tmp_path, n_layers=1)
    doc = build.assemble_build_manifest(m, [], tensorrt_version="11.0.0", gpu_name="g", compute_capability=(8, 0),
                                        plugins="jit")
    raw = json.dumps({**json.loads(doc.to_json()), **change})
    with pytest.raises(ArtifactError, match=message):
        build.BuildManifest.from_json(raw, source="build_manifest.json")


def test_default_out_dir(tmp_path: Path) -> None:
    _, m = _export_dir(tmp_path, n_layers=1)
    assert build.default_out_dir(m) == Path("engines/tiny/tp1-fp16")


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_build_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    from llama_export.cli import main

    d, _ = _export_dir(tmp_path, n_layers=1)
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[gpu,tensorrt\]'"):
        build.build_engines(d, tmp_path / "engines")
    assert main(["build", "--artifacts", str(d)]) == 2
    from llama_export.backends.tensorrt.runner import TensorRTBackend

    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        TensorRTBackend(d, 0)


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_cli_build_without_tensorrt_is_one_line_exit_2(tmp_path: Path) -> None:
    d, _ = _export_dir(tmp_path, n_layers=1)
    proc = run_cli("build", "--artifacts", str(d), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: TensorRT is not available"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "engines").exists()


class _Cache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob


class _FakeTrt:
    """Just enough of tensorrt for _Builder's timing-cache logic; `accepts` says which caches TensorRT takes."""

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            pass

    def __init__(self, accepts) -> None:
        self.accepts, outer = accepts, self

        class Config:
            def create_timing_cache(self, blob: bytes) -> _Cache:
                return _Cache(bytes(blob))

            def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
                assert ignore_mismatch is False
                outer.attached.append(cache.blob)
                return outer.accepts(cache.blob)

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_builder_config(self) -> Config:
                return Config()

        self.Builder, self.attached = Builder, []


@pytest.mark.parametrize("stale", [False, True])
def test_timing_cache_rejected_by_tensorrt_is_replaced_not_written_back(tmp_path: Path, stale: bool, caplog) -> None:
    cache_file = tmp_path / "timing.cache"
    cache_file.write_bytes(b"from another GPU")
    trt = _FakeTrt(lambda blob: blob == b"" or not stale)
    b = build._Builder(trt, cache_file, aot_plugins=True, workspace_gib=1)
    config = trt.Builder(None).create_builder_config()
    b.attach_timing_cache(config)
    b.attach_timing_cache(config)  # the next segment gets the replacement directly
    if stale:
        assert trt.attached == [b"from another GPU", b"", b""] and b.serialized_cache() == b""
        assert "rejected the timing cache" in caplog.text
    else:
        assert trt.attached == [b"from another GPU"] * 2 and b.serialized_cache() == b"from another GPU"


def test_a_rejected_empty_timing_cache_is_an_error(tmp_path: Path) -> None:
    trt = _FakeTrt(lambda blob: False)
    b = build._Builder(trt, None, aot_plugins=True, workspace_gib=1)
    with pytest.raises(ArtifactError, match="empty timing cache"):
        b.attach_timing_cache(trt.Builder(None).create_builder_config())


def test_tensorrt_caches_are_allocated_at_the_engines_static_capacity(tmp_path: Path) -> None:
    from llama_export.config import Backend
    from llama_export.runner.stitch import backend_capacity

    _, m = _export_dir(tmp_path)
    assert backend_capacity(Backend.TENSORRT, m, 5) == m.model.max_seq_len == 16  # the profiles' pinned capacity
    assert backend_capacity(Backend.ORT, m, 5) == 5


def test_importing_never_imports_tensorrt_or_triton() -> None:
    code = ("import sys, llama_export, llama_export.backends.tensorrt as t, llama_export.backends.tensorrt.kernels;"
            "import llama_export.backends.tensorrt.plugins, llama_export.backends.tensorrt.build;"
            "import llama_export.backends.tensorrt.runner; print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_build_and_run_refits_identical_layers(tmp_path: Path) -> None:
    import torch

    from llama_export.backends.tensorrt.runner import TensorRTBackend
    from llama_export.model.ops import rms_norm_reference, rope_reference

    d, m = _export_dir(tmp_path / "graphs")
    out = build.build_engines(d, tmp_path / "engines")
    doc = json.loads((out / build.BUILD_MANIFEST).read_text())
    assert (doc["engines_built"], doc["engines_refit"]) == (1, 2)
    x = torch.randn(2, 3, 8, dtype=torch.float16, device="cuda")
    ang = torch.randn(16, 2, device="cuda")  # the tables' 16 positions (graphs.attention_like_segment)
    with TensorRTBackend(out, 0, "cuda") as be:
        for k in range(3):
            start = torch.tensor([0, 7 + k], dtype=torch.int64, device="cuda")  # ragged rows
            got = be.run_segment(k, {"x": x, "cos": ang.cos(), "sin": ang.sin(), "start": start})["y"]
            g = attention_like_segment(k, seed=k).graph
            w, wq = (torch.from_numpy(onnx.numpy_helper.to_array(t).copy()).cuda() for t in g.initializer[:2])
            want = rope_reference((rms_norm_reference(x, w, 1e-5) @ wq).view(2, 3, 2, 4), ang.cos(), ang.sin(),
                                  start, True)
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("tp", [1, 2])
def test_demo_model_engines_match_eager_fp16(tmp_path: Path, tp: int) -> None:
    """The demo model exported in fp16 at TP=1 and TP=2, built into engines, against eager fp16."""
    from llama_export.config import Backend, Precision
    from llama_export.demo import DEMO_DIR
    from llama_export.export.exporter import ExportOptions, export
    from llama_export.runner.source import ModelSource
    from llama_export.validate.compare import CompareSettings, Mode, compare, format_report

    path = export(ExportOptions(checkpoint=DEMO_DIR, out=tmp_path / "g", tp=tp, dtype=Precision.FP16, progress=False))
    out = build.build_engines(path, tmp_path / "engines")
    source = ModelSource(Backend.TENSORRT, checkpoint=DEMO_DIR, artifacts=out).resolve()
    report = compare(source, CompareSettings(steps=8), mode=Mode.LOCATE, device="cuda")
    assert report.comparison, format_report(report)
