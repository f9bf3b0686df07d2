"""The LLaMA transformer for one tensor-parallel rank.

    h = embed(tokens)                                   AllGather(-1)   (embedding split on dim)
    for each layer:
        h = h + wo(attn(rms_norm(h)))                   AllReduce       (wo row-parallel; wqkv packed)
        h = h + w2(silu(w1 x) * w3 x), x = rms_norm(h)  AllReduce       (w2 row-parallel; w13 packed)
    logits = output(rms_norm(h)[b, last token of b])    AllGather(-1)   (vocab-parallel, padded)

The KV cache is preallocated (capacity C per row) and written in place at per-row positions; a batch
is right-padded: row b holds `cache_lengths[b]` cached tokens and `token_lengths[b]` new ones
(`artifact/schema.py` has the contract). The same code serves prefill, decode, ragged batches and export
(where the cache is graph I/O: `present_*` are `past_*` with the new slots written).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llama_export.config import ModelConfig
from llama_export.model import ops
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

    def empty_cache(self, batch: int, capacity: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed keys and values for `batch` rows, `[batch, local_kv_heads, capacity, head_dim]` each
        (capacity: default max_seq_len)."""
        p = next(self.parameters())
        shape = (batch, self.shape.local_kv_heads, capacity or self.cfg.max_seq_len, self.cfg.head_dim)
        return [p.new_zeros(shape) for _ in self.layers], [p.new_zeros(shape) for _ in self.layers]

    def step(self, tokens, cache_lengths, token_lengths, keys: list[Tensor],
             values: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """`forward` as the runner's step function (`engine.generate`): ids and lengths arrive as host
        arrays (numpy, or tensors) and are moved to this model's device; runs without autograd."""
        device = self.rope_cos.device
        with torch.inference_mode():
            # The lengths are on the host here: the attention plan needs no copy back from the device.
            plan = ops.plan_step(torch.as_tensor(cache_lengths).cpu(), torch.as_tensor(token_lengths).cpu(),
                                 torch.as_tensor(tokens).shape[1], device)
            return self(*(torch.as_tensor(x, device=device) for x in (tokens, cache_lengths, token_lengths)),
                        keys, values, plan=plan)

    def forward(self, tokens: Tensor, cache_lengths: Tensor, token_lengths: Tensor, keys: list[Tensor],
                values: list[Tensor], *, plan: ops.StepPlan | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """tokens: [B, S] int64, right-padded: row b's valid tokens are `tokens[b, :token_lengths[b]]` at
        positions `cache_lengths[b] + i`. keys/values: the cache, [B, local_kv_heads, C, head_dim].
        plan: `ops.plan_step` of these lengths (made here, once for all layers, when not given).

        Returns fp32 logits `[B, vocab_size]` of each row's last valid token and the caches with this
        step written (eager: the same tensors, updated in place)."""
        bsz = tokens.shape[0]
        h = self.tok_embeddings(tokens)  # [B, S, dim]
        if plan is None and not torch.compiler.is_exporting():  # export traces the attention custom op
            plan = ops.plan_step(cache_lengths, token_lengths, tokens.shape[1], h.device)
        new_keys, new_values = [], []
        for layer, k, v in zip(self.layers, keys, values):
            h, k, v = layer(h, self.rope_cos, self.rope_sin, cache_lengths, token_lengths, k, v, plan=plan)
            new_keys.append(k)
            new_values.append(v)
        # [B, 1, dim]: kept 3-D so that the output projection is a MatMul like every other weight
        last = self.norm(h[torch.arange(bsz, device=h.device), token_lengths - 1].unsqueeze(1))
        logits = self.comm.all_gather(self.output(last), dim=-1)  # [B, 1, tp * local_vocab]
        return logits[:, 0, : self.cfg.vocab_size].float(), new_keys, new_values
