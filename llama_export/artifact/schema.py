"""The graph contract every export obeys: custom nodes, graph I/O names, opset and size rules.

Custom nodes: domain `llama_export`, version 1. Semantics are written down once, here.

    RMSNorm(x, weight) -> y          attribute epsilon: float
        x: [..., D] (fp32/fp16/bf16), weight: [D] same dtype as x, y: like x
        y = (x / sqrt(mean(x^2, -1) + epsilon)).to(x.dtype) * weight, normalisation in fp32

    RoPE(x, cos, sin) -> y           attribute interleaved: int (1 = Meta pairs (2i, 2i+1),
                                                               0 = rotate-half pairs (i, i + D/2))
        x: [B, S, H, D] (fp32/fp16/bf16); cos, sin: [S, D/2] fp32 (rows = absolute positions)
        y: like x; each pair (a, b) -> (a*cos - b*sin, a*sin + b*cos), computed in fp32

    AllReduce(x) -> y                attribute world_size: int
        sum over ranks. A marker: never reaches a backend (the partition pass cuts here).

    AllGather(x) -> y                attributes axis: int (non-negative), world_size: int
        concatenation over ranks along `axis`. A marker, like AllReduce.

The torch implementations are `llama_export.model.ops.rms_norm_reference` / `rope_reference`; the
plain-ONNX reference decompositions are in `llama_export.export.reference`.

Graph I/O of a rank (segments take and give subsets of these, plus boundary values):

    inputs   tokens [batch, seq] int64, past_key_{i} / past_value_{i} [batch, kv_heads, past, head_dim]
    outputs  logits [batch, vocab] fp32, present_key_{i} / present_value_{i} [batch, kv_heads, past+seq, head_dim]

`check_model` is the one way to run `onnx.checker` on our graphs: it registers the custom-node schemas
first, so the result never depends on what else the process imported or ran before.
"""

from __future__ import annotations

DOMAIN = "llama_export"
VERSION = 1

RMS_NORM = "RMSNorm"
ROPE = "RoPE"
ALL_REDUCE = "AllReduce"
ALL_GATHER = "AllGather"

COMPUTE_OPS = (RMS_NORM, ROPE)
COLLECTIVE_OPS = (ALL_REDUCE, ALL_GATHER)

OPSET = 23
# onnxruntime rejects IR version 14 (which onnx 1.23 writes by default); IR 10 is what opset 23 was
# introduced with and what every runtime we target loads.
IR_VERSION = 10
# A protobuf cannot hold 2 GB: serialized graphs above this keep their weights in external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 1 - (64 << 20)

# Symbolic dimension names used on every exported graph's inputs and outputs.
DIM_BATCH = "batch"
DIM_SEQ = "seq"
DIM_PAST = "past"

TOKENS = "tokens"
LOGITS = "logits"


def past_key(layer: int) -> str:
    return f"past_key_{layer}"


def past_value(layer: int) -> str:
    return f"past_value_{layer}"


def present_key(layer: int) -> str:
    return f"present_key_{layer}"


def present_value(layer: int) -> str:
    return f"present_value_{layer}"


def graph_inputs(n_layers: int) -> tuple[str, ...]:
    """Input names of a rank graph, in order: tokens, every past key, every past value."""
    return (TOKENS, *map(past_key, range(n_layers)), *map(past_value, range(n_layers)))


def graph_outputs(n_layers: int) -> tuple[str, ...]:
    """Output names of a rank graph, in order: logits, every present key, every present value."""
    return (LOGITS, *map(present_key, range(n_layers)), *map(present_value, range(n_layers)))


def register_onnx_schemas() -> None:
    """Register the four ops with `onnx.defs` (idempotent), so that onnxscript can emit them and
    `onnx.checker` validates their inputs, outputs, types and attributes."""
    import onnx
    from onnx.defs import OpSchema

    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    specs = [
        (RMS_NORM, "y = x / sqrt(mean(x^2, -1) + epsilon) * weight, normalised in fp32",
         [P("x", "T"), P("weight", "T")], [P("y", "T")], [("T", float_types, "activation type")],
         [A("epsilon", onnx.helper.make_attribute("epsilon", 1e-5), "added to the mean square")]),
        (ROPE, "rotary position embedding of x [B, S, H, D] with cos/sin [S, D/2] (fp32)",
         [P("x", "T"), P("cos", "F"), P("sin", "F")], [P("y", "T")],
         [("T", float_types, "activation type"), ("F", ["tensor(float)"], "rotation tables")],
         [A("interleaved", onnx.helper.make_attribute("interleaved", 1), "1: pairs (2i, 2i+1); 0: (i, i+D/2)")]),
        (ALL_REDUCE, "sum over tensor-parallel ranks (partition marker)",
         [P("x", "T")], [P("y", "T")], [("T", float_types, "")],
         [A("world_size", OpSchema.AttrType.INT, "number of ranks")]),
        (ALL_GATHER, "concatenation over tensor-parallel ranks along axis (partition marker)",
         [P("x", "T")], [P("y", "T")], [("T", float_types, "")],
         [A("axis", OpSchema.AttrType.INT, "non-negative axis"), A("world_size", OpSchema.AttrType.INT, "ranks")]),
    ]
    # The TensorRT lowering adds these two to the compute nodes (its ONNX parser finds the plugin by
    # them); they are part of the schema so that lowered graphs still pass onnx.checker.
    plugin_attrs = [A("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=False),
                    A("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version", required=False)]
    specs = [(n, d, i, o, t, a + plugin_attrs if n in COMPUTE_OPS else a) for n, d, i, o, t, a in specs]
    for name, doc, inputs, outputs, types, attrs in specs:
        if onnx.defs.has(name, DOMAIN):
            continue
        onnx.defs.register_schema(
            OpSchema(name, DOMAIN, VERSION, doc=doc, inputs=inputs, outputs=outputs,
                     type_constraints=types, attributes=attrs)
        )


def check_model(model, *, what: str = "exported graph") -> None:
    """`onnx.checker.check_model(full_check=True)` with the custom-node schemas registered.

    `model`: an `onnx.ModelProto`, or a path (required for graphs with external data). Raises
    ArtifactError naming the first problem."""
    import onnx

    from llama_export.errors import ArtifactError

    register_onnx_schemas()
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArtifactError(f"{what} fails onnx.checker: {str(e).splitlines()[0]}") from None
