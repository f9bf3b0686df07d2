"""The tensor-parallel plan: which parameter is split how, and the pure functions that slice it.

Parameter names are Meta's (`layers.3.attention.wq.weight`); checkpoint loaders map other spellings to
them first. Every weight is a torch `Linear`/`Embedding` matrix `[out_features, in_features]`.

    kind        split along             collective after      parameters
    COLUMN      out features (dim 0)    none                  wq, w1, w3
    KV_COLUMN   KV heads (dim 0)        none                  wk, wv (replicated when tp > n_kv_heads)
    ROW         in features (dim 1)     AllReduce             wo, w2
    EMBED       model dim (dim 1)       AllGather(-1)         tok_embeddings
    VOCAB       vocab rows (dim 0)      AllGather(-1)         output (zero-padded to a multiple of tp)
    REPLICATE   -                       -                     RMSNorm weights

The model holds packed projections (`PACKED`): one `wqkv` per attention and one `w13` per FFN, each the
rank's own slices of its sources concatenated along dim 0 (q rows, then k, then v; w1 rows, then w3).
Packing happens after slicing, so every rank packs its own heads and TP slicing stays the plan above:

    checkpoint (global)        rank r slices (plan)              model parameter (rank r)
    wq [H*hd, dim]       ──►   wq[r*lh*hd : (r+1)*lh*hd]   ─┐
    wk [KVH*hd, dim]     ──►   wk[kv_start*hd : ...]        ├─►  wqkv [(lh + 2*lkv)*hd, dim]
    wv [KVH*hd, dim]     ──►   wv[kv_start*hd : ...]       ─┘
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from llama_export.config import ModelConfig
from llama_export.errors import ParallelError


class ShardKind(enum.Enum):
    COLUMN = "column"
    KV_COLUMN = "kv_column"
    ROW = "row"
    EMBED = "embed"
    VOCAB = "vocab"
    REPLICATE = "replicate"


TP_PLAN: tuple[tuple[str, ShardKind], ...] = (
    (r"tok_embeddings\.weight", ShardKind.EMBED),
    (r"layers\.\d+\.attention\.wq\.weight", ShardKind.COLUMN),
    (r"layers\.\d+\.attention\.w[kv]\.weight", ShardKind.KV_COLUMN),
    (r"layers\.\d+\.attention\.wo\.weight", ShardKind.ROW),
    (r"layers\.\d+\.feed_forward\.w[13]\.weight", ShardKind.COLUMN),
    (r"layers\.\d+\.feed_forward\.w2\.weight", ShardKind.ROW),
    (r"layers\.\d+\.(attention|ffn)_norm\.weight", ShardKind.REPLICATE),
    (r"norm\.weight", ShardKind.REPLICATE),
    (r"output\.weight", ShardKind.VOCAB),
)


# Packed model parameter (suffix after `layers.N.`) -> its checkpoint sources, concatenated along dim 0.
PACKED: dict[str, tuple[str, ...]] = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


def packed_sources(name: str) -> tuple[str, ...] | None:
    """Checkpoint names packed into model parameter `name` (None: `name` is a checkpoint name itself)."""
    m = re.fullmatch(r"(layers\.\d+\.)(.+)", name)
    if m is None or m.group(2) not in PACKED:
        return None
    return tuple(m.group(1) + src for src in PACKED[m.group(2)])


_PACKED_OF = {src: packed for packed, sources in PACKED.items() for src in sources}


def model_parameter_name(checkpoint_name: str) -> str:
    """The model parameter that holds checkpoint parameter `checkpoint_name` (itself, or its packed one)."""
    m = re.fullmatch(r"(layers\.\d+\.)(.+)", checkpoint_name)
    return m.group(1) + _PACKED_OF[m.group(2)] if m and m.group(2) in _PACKED_OF else checkpoint_name


def model_parameter_names(checkpoint_names: list[str]) -> list[str]:
    """The model's parameter names for a checkpoint's, in checkpoint order."""
    return list(dict.fromkeys(map(model_parameter_name, checkpoint_names)))


def shard_kind(name: str) -> ShardKind:
    for pattern, kind in TP_PLAN:
        if re.fullmatch(pattern, name):
            return kind
    raise KeyError(f"no tensor-parallel rule for parameter {name!r}")


def _tp_problems(cfg: ModelConfig, tp: int) -> list[str]:
    problems = []
    if cfg.n_heads % tp:
        problems.append(f"n_heads={cfg.n_heads} is not divisible by tp={tp}")
    if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
        problems.append(f"n_kv_heads={cfg.n_kv_heads} neither divides nor is divisible by tp={tp}")
    if cfg.hidden_dim % tp:
        problems.append(f"ffn hidden_dim={cfg.hidden_dim} is not divisible by tp={tp}")
    if cfg.dim % tp:
        problems.append(f"dim={cfg.dim} is not divisible by tp={tp}")
    return problems


def valid_tp_degrees(cfg: ModelConfig, limit: int = 64) -> list[int]:
    return [tp for tp in range(1, limit + 1) if not _tp_problems(cfg, tp)]


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise `ParallelError` naming the valid degrees when `tp` cannot split `cfg`."""
    if tp < 1:
        raise ParallelError(f"tp={tp} must be >= 1; valid tp: {_fmt(valid_tp_degrees(cfg))}")
    problems = _tp_problems(cfg, tp)
    if problems:
        raise ParallelError(f"{'; '.join(problems)}; valid tp: {_fmt(valid_tp_degrees(cfg))}")


def _fmt(degrees: list[int]) -> str:
    return ", ".join(map(str, degrees))


@dataclass(frozen=True)
class RankShape:
    """Per-rank sizes of one TP rank (global names are on `ModelConfig`)."""

    cfg: ModelConfig
    tp: int
    rank: int

    def __post_init__(self) -> None:
        check_tp(self.cfg, self.tp)
        if not 0 <= self.rank < self.tp:
            raise ParallelError(f"rank={self.rank} is outside 0..{self.tp - 1} for tp={self.tp}")

    @property
    def local_heads(self) -> int:
        return self.cfg.n_heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.cfg.n_kv_heads // self.tp)

    @property
    def kv_head_start(self) -> int:
        """First global KV head held by this rank (KV heads are replicated when tp > n_kv_heads)."""
        if self.tp <= self.cfg.n_kv_heads:
            return self.rank * self.local_kv_heads
        return self.rank // (self.tp // self.cfg.n_kv_heads)

    @property
    def local_hidden(self) -> int:
        return self.cfg.hidden_dim // self.tp

    @property
    def local_dim(self) -> int:
        return self.cfg.dim // self.tp

    @property
    def local_vocab(self) -> int:
        """Vocabulary rows per rank, padded up so that every rank holds the same number."""
        return -(-self.cfg.vocab_size // self.tp)


@dataclass(frozen=True)
class Slice:
    """`tensor.narrow(dim, start, stop - start)`; rows past the tensor's end are zero padding."""

    dim: int | None  # None: the whole tensor (replicated)
    start: int = 0
    stop: int = 0


def packed_sizes(name: str, shape: RankShape) -> tuple[int, ...]:
    """Rows of each source inside packed parameter `name` on this rank (wqkv: q, k, v; w13: w1, w3)."""
    return tuple(_rows(src, shape) for src in packed_sources(name) or ())


def _rows(name: str, shape: RankShape) -> int:
    sl = shard_slice(name, shape)
    return sl.stop - sl.start


def shard_slice(name: str, shape: RankShape) -> Slice:
    """The slice of global parameter `name` that rank `shape.rank` holds."""
    kind = shard_kind(name)
    r, hd = shape.rank, shape.cfg.head_dim
    if kind is ShardKind.REPLICATE:
        return Slice(None)
    if kind is ShardKind.COLUMN:
        n = shape.local_heads * hd if ".attention." in name else shape.local_hidden
        return Slice(0, r * n, (r + 1) * n)
    if kind is ShardKind.KV_COLUMN:
        start = shape.kv_head_start * hd
        return Slice(0, start, start + shape.local_kv_heads * hd)
    if kind is ShardKind.ROW:
        n = shape.local_heads * hd if ".attention." in name else shape.local_hidden
        return Slice(1, r * n, (r + 1) * n)
    if kind is ShardKind.EMBED:
        return Slice(1, r * shape.local_dim, (r + 1) * shape.local_dim)
    assert kind is ShardKind.VOCAB
    return Slice(0, r * shape.local_vocab, (r + 1) * shape.local_vocab)
