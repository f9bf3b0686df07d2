"""Lowering for ONNX Runtime: custom nodes → ONNX Runtime's fused kernels (in memory, at session creation).

The attention block of a layer becomes one `com.microsoft.GroupQueryAttention` that reads the packed
q/k/v projection, rotates q and k itself and writes the KV cache in place (its past and present share
one buffer when the runner binds them to the same memory):

    before                                                       after
    qkv ─► Reshape ─► Split ─► q ─► RoPE(start) ─┐               qkv ─┐
                            ─► k ─► RoPE(start) ─┼─► Attention   past_key, past_value ─┤
                            ─► v ────────────────┘   (past_*,    seqlens_k = start + lengths - 1 (int32)
                                                      start,     query_seqlens = lengths (int32)
                                                      lengths)   total = capacity (int32)
                                                                 cos, sin tables ─┴─► GroupQueryAttention(
                                                                     do_rotary=1, rotary_interleaved) ─► y, present_*

GQA's layout is the contract's: a right-padded batch, row b's cache in slots [0, seqlens_k[b] + 1),
`query_seqlens` valid new tokens per row, rotary positions start[b] + i (onnxruntime 1.32,
`GroupQueryAttention` schema, "Right-padded query chunks"; measured equal to `ops.attention_in_place`
to ~3e-7 in fp32). A left-padded cache would not work: GQA attends every slot below seqlens_k + 1. The
fusion applies when the block has exactly that shape, RoPE uses the node's own `start` and full tables,
and head_dim is a multiple of 16 (GQA's rotary requirement). `query_seqlens` is GQA's input 16, which
onnxruntime 1.31 does not have; without it no GQA form runs a batch of multi-token chunks over a cache
that already holds tokens ("batch_size must be 1 when sequence_length > 1 and past context is present",
measured on 1.31.1 and 1.32.0), so for such a runtime the block is left unfused (`fuse_attention=False`,
chosen by `runtime.fused_attention`) and runs as the reference decomposition.

A residual sum and the RMSNorm it feeds become one `com.microsoft.SkipSimplifiedLayerNormalization`
(as in onnxruntime-genai's graphs; ONNX Runtime's own Add + norm fusion does not know the standard
RMSNormalization), whose input_skip_bias_sum output carries the sum on to the next residual:

    h = Add(a, b); y = RMSNorm(h, w)  ──►  y, _, _, h = SkipSimplifiedLayerNormalization(a, b, w, epsilon)

Everything else is lowered one node at a time:

    RMSNorm(x, w, epsilon)           ──►  RMSNormalization(x, w, axis=-1, epsilon, stash_type=fp32)
    RoPE(x [B,S,H,D], cos, sin, start) ─►  Cast(Reshape(RotaryEmbedding(Reshape(Cast(x, fp32), [B, S, H*D]),
                                               cos, sin, position_ids = start[:, None] + Range(S),
                                               num_heads=H, interleaved), Shape(x)), T)
    Attention                        ──►  TensorScatter + Attention (opset 24; `export/reference.py`)

RoPE runs in fp32 whatever T is (the custom node's semantics) except inside the fused GQA of an fp16
graph, whose rotation tables are cast to fp16 (GQA takes tables of the activation type).
RMSNormalization accumulates in fp32 (stash_type) and applies the weight before the final rounding,
which differs from the reference by at most one fp16 ulp. The canonical graphs on disk are never
changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common

from llama_export.artifact import schema
from llama_export.backends.ort.runtime import GQA_INPUTS
from llama_export.errors import ArtifactError
from llama_export.export import reference
from llama_export.export.passes import Pass
from llama_export.export.passes.rewrite import Emit, ReplaceCustomNodesPass, attr, replace, require_opsets

MS_DOMAIN = "com.microsoft"


def _rms_norm(node: ir.Node, op: Emit) -> ir.Value:
    return op("RMSNormalization", list(node.inputs), axis=-1, epsilon=attr(node, "epsilon", 1e-5), stash_type=1)


@dataclass(frozen=True)
class _Block:
    """A layer's attention block in the canonical shape (see the module docstring)."""

    qkv: ir.Value  # [B, S, (H + 2 KVH) * D]
    q_rope: ir.Node
    heads: int
    kv_heads: int


def _single_user(value: ir.Value) -> ir.Node | None:
    users = [n for n, _ in value.uses()]
    return users[0] if len(users) == 1 else None


def _match(att: ir.Node) -> _Block | None:
    """The fusable block feeding Attention node `att`, or None."""
    q, k, v, _pk, _pv, start, _lengths = att.inputs
    q_rope, k_rope = q.producer(), k.producer()
    if any(n is None or n.op_type != schema.ROPE or n.domain != schema.DOMAIN for n in (q_rope, k_rope)):
        return None
    split = q_rope.inputs[0].producer()
    if split is None or split.op_type != "Split" or [q_rope.inputs[0], k_rope.inputs[0], v] != list(split.outputs):
        return None
    if any(_single_user(x) is None for x in split.outputs) or _single_user(q) is not att or _single_user(k) is not att:
        return None
    if q_rope.inputs[1:3] != k_rope.inputs[1:3] or q_rope.inputs[3] is not start or k_rope.inputs[3] is not start:
        return None
    if attr(q_rope, "interleaved", 1) != attr(k_rope, "interleaved", 1):
        return None
    reshape = split.inputs[0].producer()
    shapes = [x.shape for x in split.outputs]
    if reshape is None or reshape.op_type != "Reshape" or any(s is None or len(s) != 4 for s in shapes):
        return None
    dims = [s[2] for s in shapes] + [shapes[0][3]]
    if not all(isinstance(d, int) for d in dims) or attr(split, "axis", 0) not in (2, -2):
        return None
    heads, kv_heads, kv_heads_v, head_dim = dims
    qkv = reshape.inputs[0]
    cos = q_rope.inputs[1]
    if kv_heads != kv_heads_v or head_dim % 16 or qkv.shape is None or qkv.shape[-1] != (heads + 2 * kv_heads) * head_dim:
        return None
    if cos.shape is None or cos.shape[-1] != head_dim // 2:
        return None
    return _Block(qkv, q_rope, heads, kv_heads)




class OrtLoweringPass(Pass, ir.passes.InPlacePass):
    """Attention blocks → GroupQueryAttention (unless `fuse_attention` is False); remaining custom nodes
    one by one (in place)."""

    def __init__(self, *, fuse_attention: bool = True) -> None:
        super().__init__()
        self.fuse_attention = fuse_attention

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        shared: dict[str, ir.Value] = {}  # per-graph inputs of GQA, made once (first fused block)
        fused = 0
        for att in [n for n in g if n.domain == schema.DOMAIN and n.op_type == schema.ATTENTION]:
            block = _match(att) if self.fuse_attention else None
            if block is not None:
                replace(g, att, lambda node, op, block=block: _gqa(node, op, block, shared))
                fused += 1
        for norm in [n for n in g if n.domain == schema.DOMAIN and n.op_type == schema.RMS_NORM]:
            add = _residual_add(norm)
            if add is not None:
                _fuse_skip_norm(g, add, norm)
                fused += 1
        if fused:
            onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
            require_opsets(model, {MS_DOMAIN: 1})
        _PerNodePass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        left = sorted({n.op_type for n in model.graph if n.domain == schema.DOMAIN})
        if left:
            raise ArtifactError(f"custom nodes {left} cannot run on ONNX Runtime; the graph must be partitioned first")


def _residual_add(norm: ir.Node) -> ir.Node | None:
    """The residual `Add` of two equally shaped, equally typed values that feeds RMSNorm `norm`, or None."""
    add = norm.inputs[0].producer()
    if add is None or add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if a.shape is None or a.shape != b.shape or a.dtype != b.dtype:
        return None
    return add


def _fuse_skip_norm(g: ir.Graph, add: ir.Node, norm: ir.Node) -> None:
    """`h = a + b; y = RMSNorm(h, w)` -> one SkipSimplifiedLayerNormalization(a, b, w) with outputs y and
    h (its input_skip_bias_sum; mean and inv_std_var left out), in the Add's place."""
    a, b = add.inputs
    fused = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]],
                    attributes=[ir.AttrFloat32("epsilon", attr(norm, "epsilon", 1e-5))], num_outputs=4,
                    name=f"{norm.name or 'RMSNorm'}/SkipSimplifiedLayerNormalization")
    y, mean, inv_std, h = fused.outputs
    mean.name = inv_std.name = ""  # optional outputs not computed
    ir.convenience.replace_nodes_and_values(g, add, [add, norm], [fused], [add.outputs[0], norm.outputs[0]], [h, y])


def _gqa(att: ir.Node, op: Emit, block: _Block, shared: dict[str, ir.Value]):
    _q, _k, _v, past_key, past_value, start, lengths = att.inputs
    _x, cos, sin, _start = block.q_rope.inputs
    int32 = ir.DataType.INT32
    if not shared:
        shared["seqlens_k"] = op.cast(op("Sub", [op("Add", [start, lengths]), op.scalar(1)]), int32)
        shared["query_seqlens"] = op.cast(lengths, int32)
        shared["total"] = op.cast(op.dim(past_key, 2), int32)
    dtype = past_key.dtype
    key = f"tables_{dtype}"
    if key not in shared:
        shared[key] = (op.cast(cos, dtype), op.cast(sin, dtype))
    cos_t, sin_t = shared[key]
    inputs = [block.qkv, None, None, past_key, past_value, shared["seqlens_k"], shared["total"], cos_t, sin_t,
              None, None, None, None, None, None, None, shared["query_seqlens"]]
    assert len(inputs) == GQA_INPUTS
    y, present_key, present_value = op.tape.op_multi_out(
        "GroupQueryAttention", inputs,
        {"num_heads": block.heads, "kv_num_heads": block.kv_heads, "do_rotary": 1,
         "rotary_interleaved": attr(block.q_rope, "interleaved", 1)},
        domain=MS_DOMAIN, num_outputs=3, name=f"{op.prefix}/GroupQueryAttention")
    return y, present_key, present_value


class _PerNodePass(ReplaceCustomNodesPass):
    builders = {schema.RMS_NORM: _rms_norm, schema.ROPE: reference.rope_as_rotary_embedding,
                schema.ATTENTION: reference.attention}
    extra_opsets = {"": reference.ATTENTION_OPSET}


def lower_segment(path: Path, accuracy_level: int, *, fuse_attention: bool = True) -> ir.Model:
    """The canonical segment at `path` lowered for ONNX Runtime: custom nodes (`OrtLoweringPass`, GQA
    fusion unless `fuse_attention` is False), then quantized weights (`weight_only.WeightOnlyLoweringPass`
    at `accuracy_level`). Weights the lowering keeps stay references to the segment's data file (nothing
    is read); repacked ones are lazy."""
    from llama_export.backends.ort.weight_only import WeightOnlyLoweringPass

    try:
        model = ir.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise ArtifactError(f"{path.name} is not a readable ONNX model ({type(e).__name__}); re-export") from None
    OrtLoweringPass(fuse_attention=fuse_attention)(model)
    WeightOnlyLoweringPass(accuracy_level)(model)
    return model
