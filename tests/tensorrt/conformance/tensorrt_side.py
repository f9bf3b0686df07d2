"""What TensorRT's C++ side does with a Python plugin, replayed on the real tensorrt.plugin objects.

ONNX parser (onnx-tensorrt, read at commit 0137504e2b25: onnxOpImporters.cpp `FallbackPluginImporter`,
`loadFields`, `addPluginWithCreator`; importerUtils.cpp `importPluginCreator`,
`getPluginCreatorVersion`, `createPlugin`): an op it does not know is looked up in the plugin registry
by (op type, attribute `plugin_version` default "1", attribute `plugin_namespace` default ""); the
creator must be a V3 "quick" creator; for each of the creator's field names, in the creator's order,
the node attribute of that name becomes a field: FLOAT -> FLOAT32, INT -> INT32, STRING -> CHAR (with a
terminating NUL), an absent attribute is skipped; the plugin is created with the op type as its name,
the namespace, phase BUILD and a QuickPluginCreationRequest from the node's `aot` attribute (strict)
or else the network's PREFER_AOT / PREFER_JIT flags.

Builder and runtime (TensorRT 11 IPluginV3 interfaces, in the order TensorRT calls them): output data
types, output shape expressions, supported format combinations, configure, valid tactics, set tactic;
AOT plugins: launch parameters and the kernel; JIT plugins: fields to serialize, and at run time the
plugin re-created from those fields (phase RUNTIME) and enqueued.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from tests.tensorrt.conformance.fakes import (
    FakeDimensionExpr,
    FakeDimsExprs,
    FakeExprBuilder,
    FakeKernelLaunchParams,
    FakeSymExprs,
    Node,
)

QUICK_CREATOR_KIND = "PLUGIN CREATOR_V3QUICK"


def onnx_to_trt_dtype(trt: Any, elem_type: int) -> Any:
    return {onnx.TensorProto.FLOAT: trt.float32, onnx.TensorProto.FLOAT16: trt.float16,
            onnx.TensorProto.BFLOAT16: trt.bfloat16, onnx.TensorProto.INT64: trt.int64}[elem_type]


# ---- parser ---------------------------------------------------------------------------------------------


def find_creator(registry: Any, node: onnx.NodeProto) -> Any:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("plugin_version", b"1").decode()
    namespace = attrs.get("plugin_namespace", b"").decode()
    return registry.get_creator(node.op_type, version, namespace), namespace


def plugin_fields(trt: Any, node: onnx.NodeProto, creator: Any) -> list[Any]:
    """The fields `loadFields` makes from `node`'s attributes for `creator`."""
    by_name = {a.name: a for a in node.attribute}
    fields = []
    for declared in creator.field_names:
        attr = by_name.get(declared.name)
        if attr is None:
            continue  # the parser warns and leaves it to the creator's default
        if attr.type == onnx.AttributeProto.FLOAT:
            fields.append(trt.PluginField(attr.name, np.array([attr.f], np.float32), trt.PluginFieldType.FLOAT32))
        elif attr.type == onnx.AttributeProto.INT:
            fields.append(trt.PluginField(attr.name, np.array([attr.i], np.int32), trt.PluginFieldType.INT32))
        elif attr.type == onnx.AttributeProto.STRING:
            fields.append(trt.PluginField(attr.name, np.frombuffer(attr.s + b"\0", np.int8), trt.PluginFieldType.CHAR))
        else:
            raise AssertionError(f"attribute {attr.name} of type {attr.type} is not supported by the parser")
    return fields


def creation_request(trt: Any, node: onnx.NodeProto, network_flags: int) -> Any:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    Q, F = trt.QuickPluginCreationRequest, trt.NetworkDefinitionCreationFlag
    if "aot" in attrs:
        return Q.STRICT_AOT if attrs["aot"] else Q.STRICT_JIT
    aot = bool(network_flags & (1 << int(F.PREFER_AOT_PYTHON_PLUGINS)))
    jit = bool(network_flags & (1 << int(F.PREFER_JIT_PYTHON_PLUGINS)))
    assert not (aot and jit), "both PREFER_AOT_PYTHON_PLUGINS and PREFER_JIT_PYTHON_PLUGINS"
    return Q.PREFER_JIT if jit else Q.PREFER_AOT if aot else Q.UNKNOWN


def parse_plugin_node(trt: Any, registry: Any, node: onnx.NodeProto, network_flags: int) -> tuple[Any, Any]:
    """(creator, plugin) for `node`, as the ONNX parser's fallback importer creates them."""
    creator, namespace = find_creator(registry, node)
    assert creator is not None, f"Plugin not found: {node.op_type} (namespace {namespace!r})"
    assert creator.interface_info.kind == QUICK_CREATOR_KIND, creator.interface_info.kind
    fc = trt.PluginFieldCollection(plugin_fields(trt, node, creator))
    plugin = creator.create_plugin(node.op_type, namespace, fc, trt.TensorRTPhase.BUILD,
                                   creation_request(trt, node, network_flags))
    assert plugin is not None, f"could not create plugin {node.op_type}"
    return creator, plugin


# ---- builder --------------------------------------------------------------------------------------------


def output_shapes(plugin: Any, input_dims: list[list[Node]]) -> list[list[FakeDimensionExpr]]:
    inputs = [FakeDimsExprs([FakeDimensionExpr(d) for d in dims]) for dims in input_dims]
    return [list(o) for o in plugin.get_output_shapes(inputs, [], FakeExprBuilder())]


def dynamic_desc(trt: Any, dtype: Any, dims: list[Node], sizes: dict[str, int], fmt: Any = None) -> Any:
    """DynamicPluginTensorDesc: -1 for symbolic dims; min = opt = max = the concrete `sizes`."""
    d = trt.DynamicPluginTensorDesc()
    d.desc.type = dtype
    d.desc.format = trt.TensorFormat.LINEAR if fmt is None else fmt
    d.desc.dims = trt.Dims([d_ if isinstance(d_, int) else -1 for d_ in dims])
    concrete = trt.Dims([FakeDimensionExpr(x)._evaluate(sizes) for x in dims])
    d.min, d.opt, d.max = concrete, concrete, concrete
    return d


def choose_combination(plugin: Any, descs: list[Any], n_inputs: int, types: list[Any]) -> list[tuple[Any, Any]]:
    """The plugin's combinations as [(type, format)] per I/O; returns the one whose types are `types`
    (a strongly typed network fixes them)."""
    flat = plugin.get_supported_format_combinations(descs, n_inputs)
    n = len(descs)
    assert flat and len(flat) % n == 0, f"{len(flat)} descriptors for {n} I/O"
    combos = [[(p.type, p.format) for p in flat[i:i + n]] for i in range(0, len(flat), n)]
    matching = [c for c in combos if [t for t, _ in c] == types]
    assert len(matching) == 1, f"{len(matching)} combinations for types {types} among {combos}"
    return matching[0]


def configure(trt: Any, plugin: Any, descs: list[Any], n_inputs: int) -> int:
    """configure_plugin + get_valid_tactics + set_tactic, as the builder does; returns the tactic."""
    in_descs, out_descs = descs[:n_inputs], descs[n_inputs:]
    plugin.configure_plugin(in_descs, out_descs)
    tactics = plugin.get_valid_tactics()
    tactic = tactics[0] if tactics else 0  # 0: TensorRT's default tactic when a plugin lists none
    plugin.set_tactic(tactic)
    return tactic


def launch_parameters(plugin: Any, input_dims: list[list[Node]], descs: list[Any], n_inputs: int):
    """AOT: get_launch_params with fake C++ sinks; returns (launch params, extra args)."""
    params, extra = FakeKernelLaunchParams(), FakeSymExprs()
    in_exprs = [FakeDimsExprs([FakeDimensionExpr(d) for d in dims]) for dims in input_dims]
    plugin.get_launch_params(in_exprs, descs, n_inputs, params, extra, FakeExprBuilder())
    return params, extra


# ---- engine fields and runtime ----------------------------------------------------------------------------

_FIELD_NUMPY = {"FLOAT64": np.float64, "FLOAT32": np.float32, "INT64": np.int64, "INT32": np.int32,
                "INT16": np.int16, "INT8": np.int8, "CHAR": np.int8}


def serialize_fields(fc: Any) -> list[tuple[str, str, bytes]]:
    """What an engine stores for a JIT plugin's fields: name, type, raw bytes."""
    return [(f.name, f.type.name, np.asarray(f.data).tobytes()) for f in fc]


def deserialize_fields(trt: Any, stored: list[tuple[str, str, bytes]]) -> Any:
    return trt.PluginFieldCollection([
        trt.PluginField(name, np.frombuffer(raw, _FIELD_NUMPY[kind]).copy(), getattr(trt.PluginFieldType, kind))
        for name, kind, raw in stored
    ])


def plugin_tensor_desc(trt: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    p = trt.PluginTensorDesc()
    p.type, p.format, p.dims = dtype, trt.TensorFormat.LINEAR, trt.Dims(list(shape))
    return p
