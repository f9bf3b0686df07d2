"""The TensorRT lowering pass: plugin attributes on every custom node, no shadowing functions."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from llama_export.backends.tensorrt import lowering
from llama_export.errors import ArtifactError
from llama_export.export import schema
from tests.tensorrt.graphs import attention_like_segment


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_custom_nodes_get_plugin_attributes_and_functions_go() -> None:
    model = attention_like_segment(0, seed=0)
    lowered = lowering.lower_for_tensorrt(model)
    lowering.check_lowered(lowered)
    onnx.checker.check_model(lowered, full_check=True)
    custom = [n for n in lowered.graph.node if n.domain == schema.DOMAIN]
    assert [n.op_type for n in custom] == ["RMSNorm", "RoPE"]
    for n in custom:
        a = _attrs(n)
        assert a["plugin_namespace"] == b"llama_export" and a["plugin_version"] == b"1"
    assert _attrs(custom[0])["epsilon"] == pytest.approx(1e-5) and _attrs(custom[1])["interleaved"] == 1
    assert len(lowered.functions) == 0
    # Everything else untouched, and the input model not modified.
    assert [n.SerializeToString() for n in lowered.graph.node if n.domain != schema.DOMAIN] == [
        n.SerializeToString() for n in model.graph.node if n.domain != schema.DOMAIN
    ]
    assert list(lowered.graph.initializer) == list(model.graph.initializer)
    assert len(model.functions) == 1 and "plugin_namespace" not in _attrs(model.graph.node[0])


def test_lowering_is_idempotent() -> None:
    once = lowering.lower_for_tensorrt(attention_like_segment(0, seed=0))
    assert lowering.lower_for_tensorrt(once).SerializeToString() == once.SerializeToString()


def test_unrelated_functions_are_kept() -> None:
    model = attention_like_segment(0, seed=0, fn=False)
    model.functions.append(helper.make_function(
        "other", "Helper", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 21)]
    ))
    assert [f.name for f in lowering.lower_for_tensorrt(model).functions] == ["Helper"]


@pytest.mark.parametrize("op", schema.COLLECTIVE_OPS)
def test_collective_marker_is_an_error(op: str) -> None:
    model = attention_like_segment(0, seed=0)
    model.graph.node.append(helper.make_node(op, ["y"], ["z"], name="/marker", domain=schema.DOMAIN, world_size=2))
    with pytest.raises(ArtifactError, match="collectives"):
        lowering.lower_for_tensorrt(model)


def test_lower_file_round_trip(tmp_path) -> None:
    src, dst = tmp_path / "seg.onnx", tmp_path / "seg.trt.onnx"
    onnx.save(attention_like_segment(1, seed=1), str(src))
    lowering.lower_file(src, dst)
    lowering.check_lowered(onnx.load(str(dst)))
