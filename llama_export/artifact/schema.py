"""The graph contract every export obeys: custom nodes, graph I/O names, the KV cache, opset and sizes.

Custom nodes: domain `llama_export`, version 2. Semantics are written down once, here.

    RMSNorm(x, weight) -> y          attribute epsilon: float
        x: [..., D] (fp32/fp16/bf16), weight: [D] same dtype as x, y: like x
        y = (x / sqrt(mean(x^2, -1) + epsilon)).to(x.dtype) * weight, normalisation in fp32

    RoPE(x, cos, sin, start) -> y    attribute interleaved: int (1 = Meta pairs (2i, 2i+1),
                                                               0 = rotate-half pairs (i, i + D/2))
        x: [B, S, H, D] (fp32/fp16/bf16); cos, sin: [P, D/2] fp32, the model's tables (row p = position
        p); start: [B] int64. Token (b, i) is at position start[b] + i and is rotated by that row:
        each pair (a, b) -> (a*cos - b*sin, a*sin + b*cos), computed in fp32. y: like x

    Attention(q, k, v, past_key, past_value, start, lengths) -> (y, present_key, present_value)
        q: [B, S, H, D]; k, v: [B, S, KVH, D] (H a multiple of KVH; query head h reads KV head
        h // (H/KVH)); past_key, past_value: [B, KVH, C, D] the preallocated cache; start, lengths: [B]
        int64. Row b holds start[b] cached tokens in slots [0, start[b]); its new tokens are
        q/k/v[b, :lengths[b]] (right padding after), at positions start[b] + i. present_* = past_* with
        slot start[b] + i set to k/v[b, i] for i < lengths[b]. Query (b, i) attends the present keys
        j <= start[b] + i: softmax(q.k / sqrt(D)) in fp32, then times v. y: [B, S, H*D].
        Requires start[b] + S <= C. Unspecified (any value): y rows i >= lengths[b]; present slots
        >= start[b] + lengths[b]. A runtime may (and ONNX Runtime / TensorRT do) write the cache in
        place: present_* and past_* share one buffer.

    AllReduce(x) -> y                attribute world_size: int
        sum over ranks. A marker: never reaches a backend (the partition pass cuts here).

    AllGather(x) -> y                attributes axis: int (non-negative), world_size: int
        concatenation over ranks along `axis`. A marker, like AllReduce.

The torch implementations are `llama_export.model.ops` (`rms_norm_reference`, `rope_reference`,
`attention_in_place`); the plain-ONNX reference decompositions are in `llama_export.export.reference`.

Graph I/O of a rank (segments take and give subsets of these, plus boundary values):

    inputs   tokens [batch, seq] int64            right-padded: row b's tokens are tokens[b, :token_lengths[b]]
             cache_lengths [batch] int64          tokens already in row b's cache (= `start` above)
             token_lengths [batch] int64          valid tokens of row b in `tokens` (1..seq)
             past_key_{i} / past_value_{i} [batch, kv_heads, capacity, head_dim]
    outputs  logits [batch, vocab] fp32           of each row's last valid token, tokens[b, token_lengths[b] - 1]
             present_key_{i} / present_value_{i}  like past_*, with this step's tokens written

The capacity C is chosen by whoever allocates the cache (at most the model's max_seq_len, the rows of the
RoPE tables); cache_lengths[b] + seq <= C. Steps are prefills (any seq, cache_lengths may be 0) or
decodes (seq = 1); a ragged batch is one right-padded batch, not one batch per length (the runner may
prefill groups of its rows in separate calls, each on a slice of the cache's rows).

Weights are stored in external data files next to each graph (`artifact.manifest.Segment.data_file`),
so a runtime can map them instead of copying them out of a protobuf.

`check_model` is the one way to run `onnx.checker` on our graphs: it registers the custom-node schemas
first, so the result never depends on what else the process imported or ran before.
"""

from __future__ import annotations

DOMAIN = "llama_export"
VERSION = 2

RMS_NORM = "RMSNorm"
ROPE = "RoPE"
ATTENTION = "Attention"
ALL_REDUCE = "AllReduce"
ALL_GATHER = "AllGather"

COMPUTE_OPS = (RMS_NORM, ROPE, ATTENTION)
COLLECTIVE_OPS = (ALL_REDUCE, ALL_GATHER)

OPSET = 23
# onnxruntime rejects IR version 14 (which onnx 1.23 writes by default); IR 10 is what opset 23 was
# introduced with and what every runtime we target loads.
IR_VERSION = 10
# A protobuf cannot hold 2 GB, so graphs keep their weights apart: the weights of `<kk>_<kind>.onnx` (and
# of every lowered copy a backend writes) are ONNX external data in
# `<kk>_<kind>.onnx.data` beside it (location relative to the graph). A tensor of DATA_ALIGN_FROM bytes
# or more starts at a multiple of DATA_ALIGN: 64 KiB, the allocation granularity ONNX Runtime has
# required to memory-map external data (onnx_ir's former default layout; 4 KiB pages divide it);
# smaller tensors start at multiples of DATA_ALIGN_SMALL.
DATA_SUFFIX = ".data"
INLINE_BYTES = 1024  # copies written by `save_with_data` keep tensors smaller than this in the graph
DATA_ALIGN = 1 << 16
DATA_ALIGN_FROM = 1 << 20
DATA_ALIGN_SMALL = 64


def data_offset(end: int, nbytes: int) -> int:
    """Where a tensor of `nbytes` bytes starts in a data file whose used part ends at `end`."""
    align = DATA_ALIGN if nbytes >= DATA_ALIGN_FROM else DATA_ALIGN_SMALL
    return -(-end // align) * align

# Symbolic dimension names used on every exported graph's inputs and outputs.
DIM_BATCH = "batch"
DIM_SEQ = "seq"
DIM_CAPACITY = "capacity"

TOKENS = "tokens"
CACHE_LENGTHS = "cache_lengths"
TOKEN_LENGTHS = "token_lengths"
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
    """Input names of a rank graph, in order: tokens, cache and token lengths, every past key, every
    past value."""
    return (TOKENS, CACHE_LENGTHS, TOKEN_LENGTHS, *map(past_key, range(n_layers)), *map(past_value, range(n_layers)))


def cache_pairs(n_layers: int) -> dict[str, str]:
    """present_* output name -> the past_* input whose buffer it updates (in place where a runtime can)."""
    pairs = {present_key(i): past_key(i) for i in range(n_layers)}
    return pairs | {present_value(i): past_value(i) for i in range(n_layers)}


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
        (ROPE, "rotary position embedding of x [B, S, H, D]; token (b, i) at table row start[b] + i",
         [P("x", "T"), P("cos", "F"), P("sin", "F"), P("start", "I")], [P("y", "T")],
         [("T", float_types, "activation type"), ("F", ["tensor(float)"], "rotation tables"),
          ("I", ["tensor(int64)"], "row offsets")],
         [A("interleaved", onnx.helper.make_attribute("interleaved", 1), "1: pairs (2i, 2i+1); 0: (i, i+D/2)")]),
        (ATTENTION, "causal attention over a preallocated KV cache written at per-row positions",
         [P("q", "T"), P("k", "T"), P("v", "T"), P("past_key", "T"), P("past_value", "T"), P("start", "I"),
          P("lengths", "I")],
         [P("y", "T"), P("present_key", "T"), P("present_value", "T")],
         [("T", float_types, "activation type"), ("I", ["tensor(int64)"], "per-row lengths")], []),
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


def save_with_data(model, dst) -> None:
    """Write `model` (an `onnx_ir.Model`, its tensors possibly still in another file's external data)
    to `dst` in the export layout: tensors of INLINE_BYTES and more copied, in bounded chunks, into
    `dst.name + DATA_SUFFIX` beside it; smaller ones (shape constants, which shape inference must read)
    inline."""
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        cv = value.const_value
        if isinstance(cv, ir.ExternalTensor) and cv.nbytes < INLINE_BYTES:
            value.const_value = ir.Tensor(cv.numpy(), name=cv.name)
    ir.save(model, str(dst), external_data=f"{dst.name}{DATA_SUFFIX}", size_threshold_bytes=INLINE_BYTES - 1,
            alignment=DATA_ALIGN, align_threshold=DATA_ALIGN_FROM - 1)
