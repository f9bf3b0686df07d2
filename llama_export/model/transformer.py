"""The LLaMA transformer for one tensor-parallel rank.

    h = embed(tokens)                                   AllGather(-1)   (embedding split on dim)
    for each layer:
        h = h + wo(attn(rms_norm(h)))                   AllReduce       (wo row-parallel)
        h = h + w2(silu(w1 x) * w3 x), x = rms_norm(h)  AllReduce       (w2 row-parallel)
    logits = output(rms_norm(h)[:, -1])                 AllGather(-1)   (vocab-parallel, padded)

`forward` is functional in the KV cache: past keys/values go in, keys/values grown by the new tokens
come out. The same code serves prefill (P = 0), decode (S = 1) and export (cache as graph I/O).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llama_export.config import ModelConfig
from llama_export.model.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RMSNorm,
    TransformerBlock,
    rope_tables,
)
from llama_export.parallel.comm import Communicator, LocalComm
from llama_export.parallel.plan import RankShape


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, tp: int = 1, rank: int = 0, comm: Communicator | None = None):
        super().__init__()
        self.cfg = cfg
        self.shape = RankShape(cfg, tp, rank)
        self.comm = comm if comm is not None else LocalComm()
        if self.comm.world_size != tp:
            raise ValueError(f"communicator has world_size={self.comm.world_size} but tp={tp}")
        self.tok_embeddings = ParallelEmbedding(cfg.vocab_size, self.shape.local_dim, self.comm)
        self.layers = nn.ModuleList(TransformerBlock(self.shape, self.comm) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = ColumnParallelLinear(cfg.dim, self.shape.local_vocab)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def empty_cache(self, batch: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zero-length past keys and values for a prefill, `[batch, local_kv_heads, 0, head_dim]` each."""
        p = next(self.parameters())
        shape = (batch, self.shape.local_kv_heads, 0, self.cfg.head_dim)
        keys = [p.new_zeros(shape) for _ in self.layers]
        values = [p.new_zeros(shape) for _ in self.layers]
        return keys, values

    def forward(
        self, tokens: Tensor, past_keys: list[Tensor], past_values: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """tokens: [B, S] int64 at positions P..P+S-1, P = past length.

        Returns fp32 logits of the last token `[B, vocab_size]` and the grown caches."""
        seqlen = tokens.shape[1]
        start = past_keys[0].shape[2]
        h = self.tok_embeddings(tokens)  # [B, S, dim]
        cos = self.rope_cos[start : start + seqlen]  # [S, head_dim/2]
        sin = self.rope_sin[start : start + seqlen]
        # Causal mask over the whole cache: query i (absolute P+i) sees keys j <= P+i.
        rows = torch.arange(seqlen, device=tokens.device).unsqueeze(1) + start
        cols = torch.arange(start + seqlen, device=tokens.device).unsqueeze(0)
        mask = torch.zeros(seqlen, start + seqlen, device=tokens.device).masked_fill(cols > rows, float("-inf"))

        new_keys, new_values = [], []
        for layer, pk, pv in zip(self.layers, past_keys, past_values):
            h, k, v = layer(h, cos, sin, mask, pk, pv)
            new_keys.append(k)
            new_values.append(v)
        last = self.norm(h[:, -1:, :])  # [B, 1, dim]
        logits = self.comm.all_gather(self.output(last), dim=-1)  # [B, 1, tp * local_vocab]
        return logits[:, 0, : self.cfg.vocab_size].float(), new_keys, new_values
