"""Weights streamed tensor by tensor into aligned external-data files (alignment forced tiny here).

The written bytes are checked against the checkpoint itself, the files against onnx.checker and
ONNX Runtime (vs eager, fp32 tolerance), the hashes against the files, and the streaming itself by
watching the data file grow between fetches (each tensor is on disk before the next is read).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from llama_export.artifact import schema, segments
from llama_export.artifact.manifest import load_manifest, resolve_inside
from llama_export.config import Precision
from llama_export.export import exporter
from llama_export.export.exporter import ExportOptions, export, rank_graph
from llama_export.model.checkpoint import RankWeights
from llama_export.parallel.plan import RankShape
from llama_export.tolerances import TOLERANCES
from llama_export.validate.compare import validate_export
from tests.helpers import random_meta_state, tiny_config, write_meta


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    cfg = tiny_config("gqa")
    ckpt = write_meta(root / "gqa", cfg, random_meta_state(cfg, seed=21))
    mp = pytest.MonkeyPatch()
    # Every tensor of 2 KiB and more starts at a multiple of 4 KiB, smaller ones at 64 bytes.
    mp.setattr(schema, "DATA_ALIGN_FROM", 2048)
    mp.setattr(schema, "DATA_ALIGN", 4096)
    sizes, current = [], {}

    write_external_data = segments.write_external_data

    def writer(model, data_path, **kwargs):
        current["path"] = data_path
        return write_external_data(model, data_path, **kwargs)

    class Watched(exporter.AttachWeightsPass):
        def __init__(self, fetch):
            def fetch_and_look(name):  # called by the writer, when it reads the tensor
                path = current["path"]
                sizes.append((path, path.stat().st_size))
                return fetch(name)
            super().__init__(fetch_and_look)

    mp.setattr(segments, "write_external_data", writer)
    mp.setattr(exporter, "AttachWeightsPass", Watched)
    try:
        paths = {tp: export(ExportOptions(checkpoint=ckpt, out=root / "g", tp=tp, progress=False)) for tp in (1, 2)}
    finally:
        mp.undo()
    return cfg, ckpt, paths, sizes


@pytest.mark.parametrize("tp", [1, 2])
def test_weights_land_aligned_and_equal_to_the_checkpoint(streamed, tp):
    cfg, ckpt, paths, _ = streamed
    m = load_manifest(paths[tp])
    seen = 0
    with RankWeights(ckpt, RankShape(cfg, tp, tp - 1), dtype=torch.float32) as w:
        for seg in m.rank(tp - 1).segments:
            path = resolve_inside(paths[tp], seg.file)
            schema.check_model(path)  # onnx.checker with the external data resolved next to the graph
            model = onnx.load(str(path), load_external_data=False)
            if seg.data_file is None:
                assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
                continue
            data = resolve_inside(paths[tp], seg.data_file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == seg.data_sha256
            for init in model.graph.initializer:
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    assert len(init.raw_data) < 256  # only the trace's small shape constants stay inline
                    continue
                ext = {e.key: e.value for e in init.external_data}
                off, n = int(ext["offset"]), int(ext["length"])
                assert ext["location"] == seg.data_file.rsplit("/", 1)[1]
                assert off % (4096 if n >= 2048 else 64) == 0, (init.name, off, n)
                got = np.frombuffer(data[off : off + n], dtype=np.float32).reshape(tuple(init.dims))
                name = init.name.removesuffix("_t")
                if name.startswith("rope_"):
                    continue
                want = w.get(name).numpy()
                assert np.array_equal(got, want.T if init.name.endswith("_t") else want), init.name
                seen += 1
    assert seen == len(w.names())


def test_each_tensor_is_written_before_the_next_is_read(streamed):
    *_, sizes = streamed
    by_file: dict = {}
    for path, size in sizes:
        by_file.setdefault(path, []).append(size)
    assert sum(len(v) > 2 for v in by_file.values()) >= 2
    for path, seq in by_file.items():
        assert seq[0] == 0 and all(b > a for a, b in zip(seq, seq[1:])), (path, seq)


@pytest.mark.parametrize("tp", [1, 2])
def test_streamed_export_runs_on_ort_like_eager(streamed, tp):
    _, ckpt, paths, _ = streamed
    cmp = validate_export(paths[tp], ckpt)
    assert cmp and cmp.max_abs <= TOLERANCES[Precision.FP32].logits_atol and cmp.tokens_agree == 1.0, str(cmp)


def test_every_rank_traces_to_the_same_graph(streamed):
    """The exporter traces once per export; this holds because rank graphs are identical."""
    import onnx_ir as ir

    cfg = streamed[0]
    graphs = [ir.to_proto(rank_graph(cfg, tp=4, dtype=Precision.FP16, max_batch=4, rank=r)).SerializeToString()
              for r in (0, 3)]
    assert graphs[0] == graphs[1]


@pytest.mark.parametrize("tp", [1, 2])
def test_plan_predicts_the_written_tensors(streamed, tp):
    """`plan`'s per-segment tensors (from its two-layer trace) are what the export wrote, byte for byte."""
    from llama_export.export.sizing import plan_export

    cfg, _, paths, _ = streamed
    plan = plan_export(cfg, tp=tp, dtype=Precision.FP32)
    m = load_manifest(paths[tp])
    assert len(plan.segments) == len(m.rank(0).segments)
    for want, seg in zip(plan.segments, m.rank(0).segments):
        model = onnx.load(str(resolve_inside(paths[tp], seg.file)), load_external_data=False)
        written = {i.name.removesuffix("_t"): int({e.key: e.value for e in i.external_data}["length"])
                   for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        # folded shape constants (named after their reader, "/model/...") stay inline in the graph
        assert written == {t.name: t.nbytes for t in want.tensors if not t.name.startswith("/model/")}, seg.name
