"""Trace one tensor-parallel rank of the eager model into an ONNX graph (torch.onnx.export, dynamo).

RMSNorm, RoPE and cached attention become `llama_export.RMSNorm` / `RoPE` / `Attention` nodes,
collectives become `AllReduce` / `AllGather` markers (the model is built with an `ExportComm`), and the
KV cache is explicit graph I/O (names and shapes: `artifact.schema`). One graph serves prefill, decode
and ragged batches.
Example inputs use sizes >= 2 on every dynamic dimension, since a size of 1 would be specialised into
the graph. The result is weightless (`passes.placeholders`) and not yet cleaned up: the export pipeline
runs the passes.
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import onnxscript
import torch
from torch import Tensor, nn

from llama_export.artifact import schema
from llama_export.export.passes.placeholders import make_placeholder
from llama_export.model.transformer import Transformer
from llama_export.parallel.comm import markers

log = logging.getLogger(__name__)


def _translation_table() -> dict:
    schema.register_onnx_schemas()
    custom = onnxscript.values.Opset(schema.DOMAIN, schema.VERSION)

    def rms_norm(x, weight, eps: float):
        return custom.RMSNorm(x, weight, epsilon=eps)

    def rope(x, cos, sin, start, interleaved: bool):
        return custom.RoPE(x, cos, sin, start, interleaved=int(interleaved))

    def attention(q, k, v, past_key, past_value, start, lengths):
        return custom.Attention(q, k, v, past_key, past_value, start, lengths)

    def all_reduce(x, world_size: int):
        return custom.AllReduce(x, world_size=world_size)

    def all_gather(x, dim: int, world_size: int):
        return custom.AllGather(x, axis=dim, world_size=world_size)

    markers()  # registers llama_export::all_reduce / all_gather
    ops = torch.ops.llama_export
    return {
        ops.rms_norm.default: rms_norm,
        ops.rope.default: rope,
        ops.attention.default: attention,
        ops.all_reduce.default: all_reduce,
        ops.all_gather.default: all_gather,
    }


class _Flat(nn.Module):
    """Presents the model with flat KV-cache arguments so that graph I/O names are stable."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n = model.cfg.n_layers

    def forward(self, tokens: Tensor, cache_lengths: Tensor, token_lengths: Tensor, *cache: Tensor):
        logits, keys, values = self.model(tokens, cache_lengths, token_lengths, list(cache[: self.n]),
                                          list(cache[self.n :]))
        return (logits, *keys, *values)


def trace_rank(model: Transformer, *, max_batch: int) -> ir.Model:
    """Weightless ONNX graph of `model`, one rank (built with an ExportComm for tp > 1).

    `model` lives on the meta device: tracing needs shapes only, so no weight is ever in memory here.
    Every initializer comes out as a placeholder named like its parameter (or buffer);
    `passes.weights.AttachWeightsPass` fills them in one segment at a time.
    """
    cfg = model.cfg
    n = cfg.n_layers
    p = next(model.parameters())
    if p.device.type != "meta":
        raise ValueError("trace_rank expects a model on the meta device (weights are attached later)")
    b, s, capacity = 2, 3, 5  # >= 2 on every dynamic dimension, and all different
    tokens = torch.zeros(b, s, dtype=torch.int64, device="meta")
    lengths = torch.zeros(b, dtype=torch.int64, device="meta")
    kv = model.shape.local_kv_heads
    cache = [torch.zeros(b, kv, capacity, cfg.head_dim, dtype=p.dtype, device="meta") for _ in range(2 * n)]
    batch = torch.export.Dim(schema.DIM_BATCH, min=1, max=max_batch)
    seq = torch.export.Dim(schema.DIM_SEQ, min=1, max=cfg.max_seq_len)
    cap = torch.export.Dim(schema.DIM_CAPACITY, min=1, max=cfg.max_seq_len)
    dynamic = {"tokens": {0: batch, 1: seq}, "cache_lengths": {0: batch}, "token_lengths": {0: batch},
               "cache": tuple({0: batch, 2: cap} for _ in range(2 * n))}
    # The exporter's deprecation chatter and its note that torchvision ops are skipped are not the
    # user's business; both are silenced for this call only.
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Flat(model).eval(),
                (tokens, lengths, lengths.clone(), *cache),
                dynamo=True,
                dynamic_shapes=dynamic,
                custom_translation_table=_translation_table(),
                input_names=list(schema.graph_inputs(n)),
                output_names=list(schema.graph_outputs(n)),
                opset_version=schema.OPSET,
                optimize=False,
                verbose=False,
            )
    finally:
        reg_log.setLevel(old_level)
    graph_model = program.model
    for value in graph_model.graph.initializers.values():
        make_placeholder(value)
    graph_model.ir_version = schema.IR_VERSION
    return graph_model
