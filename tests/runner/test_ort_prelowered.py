"""The ONNX Runtime lowering written at export time (`backends.ort.prelower`) and the run path on it.

An export made by the main job carries `<segment>.ort.onnx` (and, for quantized weights, the repacked
`.ort.onnx.data`), listed and hashed in the manifest. `OrtBackend` creates its sessions from those files;
these tests check that they give exactly what lowering in memory gives, at TP=1 and TP=2, fp32 and int4
(embedding quantized too), that the files are verified like every other, and that a `run` on them
imports neither torch nor onnx_ir.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import onnx
import pytest

from llama_export.artifact.manifest import load_manifest, resolve_inside, verify_rank
from llama_export.backends.ort import OrtBackend
from llama_export.config import ModelConfig, ModelDType, Precision, WeightQuant
from llama_export.errors import ArtifactError
from llama_export.export.exporter import ExportOptions
from llama_export.job import run_job
from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params
from llama_export.parallel.comm import ThreadGroup
from llama_export.engine.batch import generate
from llama_export.engine.generate import pad_prompts
from llama_export.runner.stitch import empty_cache, segmented_step
from tests.helpers import REPO, random_meta_state

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=131, hidden_dim=192, max_seq_len=64)
INT4 = WeightQuant(4, 16, embedding=True)
ROWS = [[5, 9, 2, 77, 3], [41, 7]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("prelowered")
    ckpt = root / "ckpt"
    save_meta_checkpoint(ckpt, random_meta_state(CFG, seed=23), to_meta_params(CFG, multiple_of=32))
    reports = run_job(ExportOptions(checkpoint=ckpt, out=root / "graphs", progress=False), [1, 2],
                      [ModelDType(Precision.FP32), ModelDType(Precision.FP32, INT4)], validate=False)
    return {r.variant: r.path for r in reports}


def _generate(path, manifest, *, prelowered: bool):
    prompt, lengths = pad_prompts(ROWS)

    def rank_fn(rank, comm):
        be = OrtBackend(manifest, path, rank=rank, threads=1)
        assert be.prelowered == prelowered
        cache = empty_cache(manifest, rank, len(ROWS), int(lengths.max()) + 5, backend=be)
        return generate(segmented_step(manifest, be, comm=comm), prompt, cache, max_new_tokens=5,
                        prompt_lengths=lengths)

    return ThreadGroup(manifest.tp).run(rank_fn)[0]


@pytest.mark.parametrize("variant", ["tp1-fp32", "tp2-fp32", "tp1-int4b16-fp32", "tp2-int4b16-fp32"])
def test_written_lowering_runs_exactly_as_the_in_memory_one(exports, variant):
    path = exports[variant]
    manifest = load_manifest(path)  # every listed file, the lowered ones included, exists and verifies
    segments = [s for r in manifest.ranks for s in r.segments]
    assert all(s.ort is not None for s in segments)
    quantized = manifest.weight_quant is not None
    for s in segments:
        graph = onnx.load(resolve_inside(path, s.ort.file), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert not {n.domain for n in graph.node} & {"llama_export"}, ops
        # MatMulNBits' weights are repacked into the lowered graph's own data file; float weights and int4
        # embeddings (GatherBlockQuantized reads them as they are) stay in the canonical one
        assert (s.ort.data_file is not None) == ("MatMulNBits" in ops)
    assert quantized == any(s.ort.data_file is not None for s in segments)

    written = _generate(path, manifest, prelowered=True)
    stripped = dataclasses.replace(manifest, ranks=tuple(
        dataclasses.replace(r, segments=tuple(dataclasses.replace(s, ort=None) for s in r.segments))
        for r in manifest.ranks))
    in_memory = _generate(path, stripped, prelowered=False)
    assert np.array_equal(written.new_tokens, in_memory.new_tokens)
    for a, b in zip(written.steps, in_memory.steps):
        np.testing.assert_array_equal(a.logits, b.logits)


def test_exact_and_exposed_values_lower_in_memory(exports):
    manifest = load_manifest(exports["tp1-int4b16-fp32"])
    assert not OrtBackend(manifest, exports["tp1-int4b16-fp32"], rank=0, exact=True).prelowered
    fp32 = load_manifest(exports["tp1-fp32"])
    assert OrtBackend(fp32, exports["tp1-fp32"], rank=0, exact=True).prelowered  # nothing to compute exactly
    assert not OrtBackend(fp32, exports["tp1-fp32"], rank=0, extra_outputs=("x",)).prelowered


def test_a_modified_lowered_file_is_refused(exports, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(exports["tp1-int4b16-fp32"], path)
    seg = load_manifest(path).rank(0).segments[0]
    data = resolve_inside(path, seg.ort.data_file)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"ort\.onnx\.data has sha256 .* re-export"):
        verify_rank(load_manifest(path, verify_hashes=False), path, 0)


def test_run_on_ort_imports_neither_torch_nor_onnx_ir(exports, tmp_path):
    """What `llama-export run --backend ort` loads at TP=1: the import cost of torch and onnx_ir is most
    of a start-up (`benchmarks/bench_lean.py`), and neither is needed to run a written lowering."""
    out = tmp_path / "run.json"
    code = (
        "import sys\n"
        "from llama_export.cli import main\n"
        f"rc = main(['run', '--backend', 'ort', '--artifacts', {str(exports['tp1-int4b16-fp32'])!r}, '--prompt-ids',"
        f" '5,9,2', '--max-new-tokens', '3', '--threads', '1', '--json', {str(out)!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'onnx_ir', 'onnx_ir.passes') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "0 []", proc.stdout
    assert len(__import__("json").loads(out.read_text())["batches"][0]["tokens"][0]) == 3


def test_an_unreadable_lowered_graph_is_one_line(exports, tmp_path):
    """A written lowering that ONNX Runtime cannot load (hashes skipped, e.g. a verified file replaced
    on a filesystem without ctime) is an ArtifactError naming the file, not onnxruntime's traceback."""
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(exports["tp1-fp32"], path)
    manifest = load_manifest(path)
    resolve_inside(path, manifest.rank(0).segments[0].ort.file).write_bytes(b"not a protobuf")
    with pytest.raises(ArtifactError, match=r"^rank0/00_full\.ort\.onnx cannot be opened by onnxruntime [0-9.]+ .*; re-export$"):
        OrtBackend(manifest, path, rank=0)
