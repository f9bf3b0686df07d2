"""Trace, cleanup, naming and weight attachment on a tiny rank graph."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from llama_export.export.passes.naming import name_graph
from llama_export.export.passes.weights import attach_weights, placeholder_names
from llama_export.export.trace import trace_rank
from llama_export.model.transformer import Transformer
from llama_export.parallel.comm import ExportComm
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def traced():
    cfg = tiny_config("gqa")
    with torch.device("meta"):
        model = Transformer(cfg, tp=2, rank=1, comm=ExportComm(1, 2))
    proto = trace_rank(model.to("meta").eval(), max_batch=4)
    return cfg, proto


def test_trace_holds_no_weights_and_cleanup_left_no_identity(traced):
    cfg, proto = traced
    assert all(i.data_location == onnx.TensorProto.EXTERNAL and not i.raw_data for i in proto.graph.initializer
               if i.name.startswith("model."))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Identity"] == 0
    # One Transpose per linear weight waits for the weights pass (7 per layer + output).
    assert ops["Transpose"] >= 7 * cfg.n_layers + 1


def test_naming_gives_unique_module_paths(traced):
    cfg, proto = traced
    named = onnx.ModelProto()
    named.CopyFrom(proto)
    name_graph(named)
    names = [n.name for n in named.graph.node]
    assert len(names) == len(set(names))
    assert "/model/layers.1/attention/wq/MatMul" in names
    assert "/model/layers.0/attention_norm/RMSNorm" in names
    assert not any("_empty_nn_module_stack" in n for n in names)
    inits = {i.name for i in named.graph.initializer}
    assert {"layers.0.attention.wq.weight", "tok_embeddings.weight", "rope_cos"} <= inits
    outs = {o for n in named.graph.node for o in n.output}
    assert "/model/layers.1/attention/wq/MatMul_output_0" in outs


def test_attach_weights_folds_transposes(traced):
    cfg, proto = traced
    named = onnx.ModelProto()
    named.CopyFrom(proto)
    name_graph(named)
    before = Counter(n.op_type for n in named.graph.node)["Transpose"]
    shapes = {i.name: tuple(i.dims) for i in named.graph.initializer}
    fetched = []

    def fetch(name):
        fetched.append(name)
        return torch.full(shapes[name], 0.5)

    attach_weights(named, fetch)
    assert placeholder_names(named) == []
    after = Counter(n.op_type for n in named.graph.node)["Transpose"]
    linear = 7 * cfg.n_layers + 1
    assert before - after == linear
    wq = next(i for i in named.graph.initializer if i.name == "layers.0.attention.wq.weight_t")
    assert tuple(wq.dims) == tuple(reversed(shapes["layers.0.attention.wq.weight"]))
    with pytest.raises(Exception, match="shape"):
        again = onnx.ModelProto()
        again.CopyFrom(proto)
        name_graph(again)
        attach_weights(again, lambda name: torch.zeros(1))
