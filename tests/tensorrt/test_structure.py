"""Structure key: layer segments that differ only in names and weights share one engine build."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from llama_export.backends.tensorrt import structure
from tests.tensorrt.graphs import attention_like_segment


def test_layers_share_a_key_and_sizes_do_not() -> None:
    l0, l3 = attention_like_segment(0, seed=0), attention_like_segment(3, seed=3)
    assert structure.structure_key(l0) == structure.structure_key(l3)
    assert structure.structure_key(l0) != structure.structure_key(attention_like_segment(0, seed=0, d=16))
    assert structure.structure_key(l0) != structure.structure_key(attention_like_segment(0, seed=0, heads=4))


def test_key_sees_attributes_and_integer_initializers() -> None:
    base = attention_like_segment(0, seed=0)
    eps = onnx.ModelProto()
    eps.CopyFrom(base)
    eps.graph.node[0].attribute[0].f = 1e-6
    assert structure.structure_key(eps) != structure.structure_key(base)
    shape = onnx.ModelProto()
    shape.CopyFrom(base)
    shape.graph.initializer[2].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(base.graph.initializer[2])[[0, 1, 3, 2]], base.graph.initializer[2].name))
    assert structure.structure_key(shape) != structure.structure_key(base)


def test_rename_like_keeps_weights_and_takes_reference_names() -> None:
    l0, l3 = attention_like_segment(0, seed=0), attention_like_segment(3, seed=3)
    r = structure.rename_like(l3, l0)
    assert [t.name for t in r.graph.initializer] == [t.name for t in l0.graph.initializer]
    assert [n.name for n in r.graph.node] == [n.name for n in l0.graph.node]
    assert [t.raw_data for t in r.graph.initializer] == [t.raw_data for t in l3.graph.initializer]
    onnx.checker.check_model(r)
    with pytest.raises(ValueError, match="differ in structure"):
        structure.rename_like(attention_like_segment(0, seed=0, d=16), l0)


def test_io_name_map() -> None:
    a, b = attention_like_segment(0, seed=0), attention_like_segment(1, seed=1)
    b.graph.input[0].name = "x_1"
    b.graph.node[0].input[0] = "x_1"
    assert structure.io_name_map(b, a) == {"x_1": "x", "cos": "cos", "sin": "sin", "start": "start", "y": "y"}
