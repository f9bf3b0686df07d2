"""`compare`: a clean export passes; a corrupted weight is located at the layer where it was planted."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llama_export.config import Backend
from llama_export.export.exporter import ExportOptions, export
from llama_export.artifact.manifest import load_manifest, sha256_file
from llama_export.runner.source import ModelSource
from llama_export.validate.compare import CompareSettings, Mode, compare, format_report, write_json
from llama_export.validate.diff import Comparison, TensorDiff
from tests.helpers import random_meta_state, run_cli, tiny_config, write_meta


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    cfg = tiny_config("gqa")
    ckpt = write_meta(root / "gqa", cfg, random_meta_state(cfg, seed=21))
    return ckpt, export(ExportOptions(checkpoint=ckpt, out=root / "graphs", tp=2, progress=False))


def _source(export_dir, ckpt):
    return ModelSource(Backend.ORT, checkpoint=ckpt, artifacts=export_dir).resolve()


def _corrupt(src, dst, segment_name: str, weight_substring: str, *, value: float | None = None):
    """A copy of the export with one weight far off (or set to `value`)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    seg = next(s for s in m["ranks"][0]["segments"] if s["name"] == segment_name)
    path = dst / seg["file"]
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if weight_substring in i.name)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = w.flat[0] + 5.0 if value is None else value
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    seg["sha256"] = sha256_file(path)  # a deliberate corruption, not tampering: keep the manifest consistent
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_clean_export_passes_everywhere(exported):
    ckpt, path = exported
    report = compare(_source(path, ckpt), CompareSettings(steps=4), mode=Mode.LOCATE)
    assert report.comparison.max_abs <= report.comparison.tolerance and report.first_divergence() is None
    assert {s.label for s in report.segments} >= {"embed", "layers.0.attention", "layers.1.ffn", "head", "tail"}
    assert all(s.rel < 1e-5 for s in report.segments)


@pytest.mark.parametrize("segment,weight,label", [
    ("04_layers.1.ffn", "feed_forward.w13", "layers.1.ffn"),
    ("01_layers.0.attention", "attention.wqkv", "layers.0.attention"),
])
def test_corruption_is_located(exported, tmp_path, segment, weight, label):
    ckpt, path = exported
    bad = _corrupt(path, tmp_path / "bad", segment, weight)
    report = compare(_source(bad, ckpt), CompareSettings(steps=2), mode=Mode.LOCATE)
    first = report.first_divergence()
    assert first is not None and first.label == label and first.rank == 0
    earlier = [s for s in report.segments if s.index < first.index]
    assert earlier and all(s.rel < report.threshold for s in earlier)


@pytest.mark.slow
def test_cli_writes_report_and_plot_and_fails_on_corruption(exported, tmp_path):
    ckpt, path = exported
    bad = _corrupt(path, tmp_path / "bad", "04_layers.1.ffn", "feed_forward.w2")
    r = run_cli("compare", "--artifacts", str(bad), "--backend", "ort", "--checkpoint", str(ckpt), "--steps", "2",
                "--json", str(tmp_path / "r.json"))
    assert r.returncode == 1, r.stderr
    assert "error starts at: layers.1.ffn (rank 0)" in r.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["first_divergence"] == {"segment": "layers.1.ffn", "rank": 0} and not data["pass"]
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ok = run_cli("compare", "--artifacts", str(path), "--checkpoint", str(ckpt), "--steps", "2")
    assert ok.returncode == 0 and "no segment exceeds" in ok.stdout, ok.stderr
    assert np.isfinite([s["max_abs"] for s in data["segments"]]).all()


def test_nan_in_the_export_fails_and_is_located(exported, tmp_path):
    """A NaN weight: every comparison with NaN fails (none is skipped by max() over a list, none passes
    `<=`), the segment where it starts is named, and the JSON report is valid JSON (NaN as null)."""
    ckpt, path = exported
    bad = _corrupt(path, tmp_path / "bad", "04_layers.1.ffn", "feed_forward.w2", value=float("nan"))
    report = compare(_source(bad, ckpt), CompareSettings(steps=2), mode=Mode.LOCATE)
    assert not report and not report.comparison
    assert np.isnan(report.comparison.max_abs) and np.isnan(report.comparison.min_cosine)
    first = report.first_divergence()
    assert first is not None and first.label == "layers.1.ffn" and first.rank == 0
    assert "FAIL" in format_report(report) and "worst at step 0 logits" in format_report(report)
    write_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())  # json.loads accepts NaN: check the text has none
    assert "NaN" not in (tmp_path / "r.json").read_text() and data["pass"] is False
    assert data["logits"][0]["max_abs"] is None


def test_comparison_with_a_nan_anywhere_fails():
    """max() and min() over a list skip a NaN that is not first; the comparison must not."""
    fine, nan = TensorDiff("a", 1e-6, 1e-7, 1.0), TensorDiff("b", float("nan"), float("nan"), float("nan"))
    for order in ([fine, nan], [nan, fine]):
        c = Comparison("x", tolerance=1e-4, logits=list(order))
        assert not c and np.isnan(c.max_abs) and np.isnan(c.min_cosine) and c.worst() is nan
    assert Comparison("x", tolerance=1e-4, logits=[fine, fine])


def test_corruption_is_located_inside_a_tp1_graph(exported, tmp_path):
    """A TP=1 export is one graph; compare reads the module outputs inside it as extra ORT outputs."""
    ckpt, _ = exported
    path = export(ExportOptions(checkpoint=ckpt, out=tmp_path / "g", tp=1, progress=False))
    clean = compare(_source(path, ckpt), CompareSettings(steps=1), mode=Mode.LOCATE)
    assert clean.comparison.max_abs <= clean.comparison.tolerance and clean.first_divergence() is None
    assert [s.label for s in clean.segments] == [
        "embed", "layers.0.attention", "layers.0.ffn", "layers.1.attention", "layers.1.ffn", "head", "logits"]
    bad = _corrupt(path, tmp_path / "bad", "00_full", "layers.1.feed_forward.w13")
    report = compare(_source(bad, ckpt), CompareSettings(steps=1), mode=Mode.LOCATE)
    first = report.first_divergence()
    assert first is not None and first.label == "layers.1.ffn"
    assert all(s.rel < report.threshold for s in report.segments if s.index < first.index)


def _polygraphy(dump: Path, command: str) -> subprocess.CompletedProcess:
    """Run one line of the dump's commands.txt with Polygraphy's own CLI (from the dump directory)."""
    argv = shlex.split(command)
    assert argv[0] == "polygraphy"
    exe = Path(sys.executable).with_name("polygraphy")
    return subprocess.run([str(exe), *argv[1:]], cwd=dump, capture_output=True, text=True, timeout=300)


def test_polygraphy_checks_one_segment_alone(exported, tmp_path):
    """compare --polygraphy: `polygraphy run <segment>.ort.onnx --onnxrt` on the saved feeds passes against
    eager's outputs; the same check on an export with a corrupted weight in that segment fails."""
    ckpt, path = exported
    seg = "01_layers.0.attention"
    command = None
    for name, export_dir in (("clean", path), ("bad", _corrupt(path, tmp_path / "bad", seg, "attention.wq"))):
        m = load_manifest(export_dir)
        dump = tmp_path / f"pg-{name}"
        compare(_source(export_dir, ckpt), CompareSettings(steps=1), mode=Mode.LOCATE, polygraphy=dump)
        for r in range(m.tp):
            for s in m.rank(r).segments:
                for suffix in (".inputs.json", ".eager.json", ".ort.onnx", ".trt.onnx"):
                    assert (dump / f"rank{r}" / f"{s.name}{suffix}").is_file()
        lines = (dump / "commands.txt").read_text().splitlines()
        command = next(c for c in lines if c.startswith(f"polygraphy run rank0/{seg}.ort.onnx --onnxrt"))
        proc = _polygraphy(dump, command)
        log = proc.stdout + proc.stderr
        if name == "clean":
            assert proc.returncode == 0, log[-4000:]
            # eager references for the tensor the all-reduce takes and the KV cache were compared
            for out in ("/model/layers.0/attention/wo/MatMul_output_0", "present_key_0", "present_value_0"):
                assert f"PASSED | Output: '{out}'" in log, log[-4000:]
        else:
            assert proc.returncode != 0 and "FAILED | Output: '/model/layers.0/attention/wo/MatMul_output_0'" in log, \
                log[-4000:]
