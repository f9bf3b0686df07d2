"""LLaMA layers for one tensor-parallel rank (Meta's `model.py` names: wq, w1, freqs_cis ...).

Column- and row-parallel linears differ in two things only: which dimension of the weight is split
(see `parallel.plan`) and which collective follows (none / AllReduce). The collective is a visible call
in `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_export.config import ModelConfig, RopeScaling
from llama_export.model import ops
from llama_export.parallel.comm import Communicator
from llama_export.parallel.plan import RankShape


# ---- RoPE ----------------------------------------------------------------------------------------
def apply_rope_scaling(freqs: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama-3.1 frequency scaling (Meta `apply_scaling`, HF `_compute_llama3_parameters`)."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    out = torch.where(wavelen < high_wavelen, freqs, scaled)
    return torch.where(wavelen > low_wavelen, freqs / scaling.factor, out)


def precompute_freqs_cis(
    dim: int, end: int, theta: float = 10000.0, scaling: RopeScaling | None = None
) -> Tensor:
    """Complex rotations `[end, dim/2]`: entry (t, i) is exp(1j * t * theta^(-2i/dim)).

    Always built on the CPU in float64 (then complex64), also inside a `torch.device("meta")` context."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu")[: dim // 2] / dim))
    if scaling is not None:
        freqs = apply_rope_scaling(freqs, scaling)
    t = torch.arange(end, dtype=torch.float64, device="cpu")
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """The model's RoPE tables `(cos, sin)`, each `[max_seq_len, head_dim/2]` fp32 (whatever the model
    dtype: rotation is computed in fp32). Buffers `rope_cos` / `rope_sin` of `Transformer`."""
    freqs_cis = precompute_freqs_cis(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    return freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()


# ---- norms and parallel linears ------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class ColumnParallelLinear(nn.Module):
    """Holds rows `[rank*out_local, (rank+1)*out_local)` of the weight; output stays sharded."""

    def __init__(self, in_features: int, out_local: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Holds columns of the weight for this rank's input slice; partial outputs are summed."""

    def __init__(self, in_local: int, out_features: int, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(torch.empty(out_features, in_local))

    def forward(self, x: Tensor) -> Tensor:
        return self.comm.all_reduce(F.linear(x, self.weight))


class ParallelEmbedding(nn.Module):
    """Embedding split along the model dimension, then gathered (Meta's `ParallelEmbedding`)."""

    def __init__(self, vocab_size: int, local_dim: int, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(torch.empty(vocab_size, local_dim))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.comm.all_gather(F.embedding(tokens, self.weight), dim=-1)


# ---- attention and FFN ---------------------------------------------------------------------------
class Attention(nn.Module):
    """Packed q/k/v projection (this rank's heads), RoPE, cached attention, row-parallel output."""

    def __init__(self, shape: RankShape, comm: Communicator) -> None:
        super().__init__()
        cfg = shape.cfg
        self.local_heads = shape.local_heads
        self.local_kv_heads = shape.local_kv_heads
        self.head_dim = cfg.head_dim
        self.wqkv = ColumnParallelLinear(cfg.dim, (self.local_heads + 2 * self.local_kv_heads) * cfg.head_dim)
        self.wo = RowParallelLinear(self.local_heads * cfg.head_dim, cfg.dim, comm)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start: Tensor, lengths: Tensor, past_k: Tensor,
                past_v: Tensor, *, plan: ops.StepPlan | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, S, dim]; cos/sin: RoPE tables [max_seq_len, head_dim/2]; start/lengths: [B] cached and
        new tokens per row; past_k/past_v: [B, local_kv_heads, C, head_dim]; plan: the forward's
        `ops.plan_step` (eager). Returns (out, k, v): the cache with this step's keys/values written (see
        `ops.attention`)."""
        xqkv = self.wqkv(x).unflatten(-1, (self.local_heads + 2 * self.local_kv_heads, self.head_dim))
        xq, xk, xv = xqkv.split([self.local_heads, self.local_kv_heads, self.local_kv_heads], dim=2)
        xq = ops.rope(xq, cos, sin, start, True)  # [B, S, h, hd]
        xk = ops.rope(xk, cos, sin, start, True)  # [B, S, kvh, hd]
        out, keys, values = ops.attention(xq, xk, xv, past_k, past_v, start, lengths, plan=plan)  # [B, S, h*hd]
        return self.wo(out), keys, values


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 packed into one `w13` (w1 rows first)."""

    def __init__(self, shape: RankShape, comm: Communicator) -> None:
        super().__init__()
        cfg = shape.cfg
        self.w13 = ColumnParallelLinear(cfg.dim, 2 * shape.local_hidden)
        self.w2 = RowParallelLinear(shape.local_hidden, cfg.dim, comm)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, shape: RankShape, comm: Communicator) -> None:
        super().__init__()
        cfg: ModelConfig = shape.cfg
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(shape, comm)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(shape, comm)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start: Tensor, lengths: Tensor, past_k: Tensor,
                past_v: Tensor, *, plan: ops.StepPlan | None = None) -> tuple[Tensor, Tensor, Tensor]:
        attn, keys, values = self.attention(self.attention_norm(x), cos, sin, start, lengths, past_k, past_v,
                                            plan=plan)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h)), keys, values
