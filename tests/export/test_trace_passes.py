"""Trace, cleanup, naming and weight attachment on a tiny rank graph, and the pass pipeline contract."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import pytest
import torch

from llama_export.artifact.segments import write_external_data
from llama_export.errors import ArtifactError
from llama_export.export.passes import Pipeline
from llama_export.export.passes.check import CheckRankGraphPass
from llama_export.export.passes.cleanup import CleanupPass
from llama_export.export.passes.naming import NameGraphPass
from llama_export.export.passes.placeholders import is_placeholder, placeholder_names
from llama_export.export.passes.weights import AttachWeightsPass
from llama_export.export.trace import trace_rank
from llama_export.model.transformer import Transformer
from llama_export.parallel.comm import ExportComm
from tests.helpers import tiny_config


def _trace():
    cfg = tiny_config("gqa")
    with torch.device("meta"):
        model = Transformer(cfg, tp=2, rank=1, comm=ExportComm(1, 2))
    return cfg, trace_rank(model.to("meta").eval(), max_batch=4)


@pytest.fixture(scope="module")
def traced():
    return _trace()


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def test_trace_holds_no_weights(traced):
    cfg, model = traced
    weights = [v for v in model.graph.initializers.values() if v.const_value.size > 16]
    # every linear (wqkv, wo, w13, w2 per layer + output), the embedding, the norms and the two RoPE tables
    assert len(weights) >= 4 * cfg.n_layers + 1 + 1 + 2 * cfg.n_layers + 1 + 2
    assert all(is_placeholder(v) for v in weights)


def test_cleanup_removes_identities_and_keeps_weight_transposes(traced):
    cfg, model = traced
    model = _copy(model)
    CleanupPass()(model)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["Identity"] == 0
    # One Transpose per linear weight waits for the weights pass (4 per layer: packed wqkv and w13).
    assert ops["Transpose"] >= 4 * cfg.n_layers + 1
    assert set(placeholder_names(model)) >= {"model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight"}


def test_naming_gives_unique_module_paths(traced):
    cfg, model = traced
    named = _copy(model)
    Pipeline(CleanupPass(), NameGraphPass())(named)
    names = [n.name for n in named.graph]
    assert len(names) == len(set(names))
    assert "/model/layers.1/attention/wqkv/MatMul" in names
    assert "/model/layers.0/attention_norm/RMSNorm" in names
    assert not any("_empty_nn_module_stack" in n for n in names)
    assert {"layers.0.attention.wqkv.weight", "tok_embeddings.weight", "rope_cos"} <= set(named.graph.initializers)
    outs = {o.name for n in named.graph for o in n.outputs}
    assert "/model/layers.1/attention/wqkv/MatMul_output_0" in outs


def test_attach_weights_folds_transposes(traced, tmp_path):
    cfg, model = traced
    named = _copy(model)
    Pipeline(CleanupPass(), NameGraphPass())(named)
    before = Counter(n.op_type for n in named.graph)["Transpose"]
    shapes = {name: tuple(v.shape) for name, v in named.graph.initializers.items()}
    fetched = []

    def fetch(name):
        fetched.append(name)
        return torch.full(shapes[name], 0.5)

    AttachWeightsPass(fetch)(named)
    assert placeholder_names(named) == [] and fetched == []  # attached lazily: nothing read yet
    write_external_data(named, tmp_path / "w.data")
    assert sorted(fetched) == sorted(set(shapes) - {n for n in shapes if n.startswith("/model/")})  # each read once
    after = Counter(n.op_type for n in named.graph)["Transpose"]
    linear = 4 * cfg.n_layers + 1  # wqkv, wo, w13, w2 per layer, and the output projection
    assert before - after == linear
    wq = named.graph.initializers["layers.0.attention.wqkv.weight_t"]
    assert tuple(wq.shape) == tuple(reversed(shapes["layers.0.attention.wqkv.weight"]))
    assert tuple(wq.const_value.shape) == tuple(wq.shape)


def test_wrong_weight_shape_is_a_user_error_naming_the_weight(traced, tmp_path):
    _, model = traced
    again = _copy(model)
    with pytest.raises(ArtifactError, match=r"weight .* has shape \(1,\) but the graph expects"):
        Pipeline(CleanupPass(), NameGraphPass(), AttachWeightsPass(lambda name: torch.zeros(1)))(again)
        write_external_data(again, tmp_path / "w.data")


def test_pipeline_failure_names_the_passes_that_ran(traced):
    """An internal failure (not a user error) says which pass failed after which."""
    _, model = traced
    again = _copy(model)

    class Broken(CheckRankGraphPass):
        def call(self, model):
            raise RuntimeError("boom")

    with pytest.raises(ir.passes.PassError, match=r"'Broken' pass after the following passes: \['CleanupPass', "
                                                  r"'NameGraphPass'\]"):
        Pipeline(CleanupPass(), NameGraphPass(), Broken(tiny_config("gqa"), 2))(again)


def test_cleanup_refuses_a_graph_with_weights_attached(traced):
    _, model = traced
    again = _copy(model)
    Pipeline(CleanupPass(), NameGraphPass())(again)
    shapes = {name: tuple(v.shape) for name, v in again.graph.initializers.items()}
    AttachWeightsPass(lambda name: torch.ones(shapes[name]))(again)
    with pytest.raises(ir.passes.PreconditionError):
        CleanupPass()(again)


def test_an_export_holds_no_source_path_of_the_machine_that_traced_it(tmp_path):
    """torch.onnx records each node's Python stack (file paths of this checkout); an export drops them,
    so its bytes do not depend on where the package is installed."""
    from pathlib import Path

    import llama_export
    from llama_export.export.exporter import export
    from llama_export.export.options import ExportOptions
    from tests.helpers import random_meta_state, tiny_config, write_meta

    cfg = tiny_config("mha")
    meta = write_meta(tmp_path / "meta", cfg, random_meta_state(cfg, seed=3))
    out = export(ExportOptions(checkpoint=meta, out=tmp_path / "graphs", tp=1, progress=False))
    source = str(Path(llama_export.__file__).resolve().parent).encode()
    graphs = sorted(out.rglob("*.onnx"))
    assert graphs
    for g in graphs:
        data = g.read_bytes()
        assert source not in data and b"stack_trace" not in data, g
