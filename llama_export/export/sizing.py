"""What an export will weigh, per rank, before any weight is read: the `plan` command's numbers.

The sizes come from the exporter's own weightless trace and partition (`exporter.rank_graph`,
`passes.partition`), so they cannot drift from what `export` writes. Tracing costs about a second per
layer and grows faster than linearly (405B's 126 layers: over 4 minutes), so the plan traces a model of
the same widths with two layers and repeats the second one: every layer has the same tensors and
segments, which `plan_export` checks on the two it traced. All ranks trace to the same graph (the
vocabulary is padded to a multiple of tp), so one trace serves every rank.

Bytes counted per segment are its initializers: the rank's weight slices plus the fp32 RoPE tables
`[max_seq_len, head_dim/2]`, which every segment that applies RoPE carries (each segment stands alone).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import onnx_ir as ir
from pydantic import ByteSize

from llama_export.config import ModelConfig, Precision
from llama_export.errors import ConfigError
from llama_export.export.exporter import rank_graph, segment_kinds
from llama_export.export.passes.partition import partition
from llama_export.model.checkpoint import expected_shapes
from llama_export.parallel.plan import RankShape, check_tp, model_parameter_names, valid_tp_degrees

GiB = 1 << 30
# The export memory target: at most this plus twice the largest weight tensor of the rank.
EXPORT_BASE_BYTES = 2 * GiB

_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SegmentSize:
    kind: str  # full | embed | attention | ffn | head | tail
    layer: int | None
    tensors: tuple[TensorSize, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ExportPlan:
    """Sizes of one rank (every rank of an export holds the same shapes)."""

    cfg: ModelConfig
    tp: int
    dtype: Precision
    segments: tuple[SegmentSize, ...]
    kv_bytes_per_token: int  # K and V of every layer, this rank's KV heads, one sequence
    max_batch: int  # what the plan was traced for (the same for a plan at another tp)

    @property
    def rank_bytes(self) -> int:
        """Bytes of one rank's graphs (weights + RoPE tables)."""
        return sum(s.nbytes for s in self.segments)

    @property
    def weight_bytes(self) -> int:
        """Bytes of one rank's parameter slices (without the RoPE tables and the trace's shape constants)."""
        params = set(model_parameter_names(list(expected_shapes(self.cfg))))  # packed wqkv / w13 included
        return sum(t.nbytes for s in self.segments for t in s.tensors if t.name in params)

    @property
    def largest_tensor(self) -> TensorSize:
        return max((t for s in self.segments for t in s.tensors), key=lambda t: t.nbytes)

    @property
    def kv_bytes_at_limit(self) -> int:
        """KV cache of one sequence at the context limit (max_seq_len tokens)."""
        return self.kv_bytes_per_token * self.cfg.max_seq_len

    @property
    def run_bytes(self) -> int:
        """What a rank holds to serve one sequence at the context limit: graphs + KV cache."""
        return self.rank_bytes + self.kv_bytes_at_limit

    @property
    def export_target_bytes(self) -> int:
        """The export's memory target for one rank: 2 GiB + 2x the largest weight tensor."""
        return EXPORT_BASE_BYTES + 2 * self.largest_tensor.nbytes

    @property
    def need_bytes(self) -> int:
        """The most one rank needs: to run one sequence at the context limit, or to be exported."""
        return max(self.run_bytes, self.export_target_bytes)

    @property
    def _run_bound(self) -> bool:
        """The KV cache and graphs, not the export, decide the need (a shorter context would help)."""
        return self.run_bytes >= self.export_target_bytes

    def check_fits(self, limit: int) -> None:
        """Raise ConfigError (one line, with the way out) when a rank needs more than `limit` bytes
        to run one sequence at the context limit, or to be exported. The way out names only the
        larger TP degrees whose plans fit (each is planned), or says that none does."""
        if self.need_bytes <= limit:
            return
        if self._run_bound:
            need = (f"a rank at tp={self.tp} needs {fmt_bytes(self.run_bytes)} (graphs "
                    f"{fmt_bytes(self.rank_bytes)} + KV cache {fmt_bytes(self.kv_bytes_at_limit)} at "
                    f"{self.cfg.max_seq_len} tokens)")
        else:
            need = (f"exporting a rank at tp={self.tp} needs up to {fmt_bytes(self.export_target_bytes)} "
                    f"(2 GiB + 2x its largest tensor, {self.largest_tensor.name})")
        larger = [plan_export(self.cfg, tp=t, dtype=self.dtype, max_batch=self.max_batch)
                  for t in valid_tp_degrees(self.cfg) if t > self.tp]
        fit = [p.tp for p in larger if p.need_bytes <= limit]
        shorter = " or a shorter --max-seq-len" if self._run_bound else ""
        if fit:
            way_out = f"use a --tp that fits it ({', '.join(map(str, fit))}){shorter}"
        else:
            least = min([self, *larger], key=lambda p: p.need_bytes)
            way_out = (f"no valid --tp fits (the least a rank needs is {fmt_bytes(least.need_bytes)}, at "
                       f"tp={least.tp}); use a machine with more memory"
                       + (" or a shorter --max-seq-len" if least._run_bound else ""))
        raise ConfigError(f"{need} but --memory-limit is {fmt_bytes(limit)}; {way_out}")


def plan_export(cfg: ModelConfig, *, tp: int, dtype: Precision, max_batch: int = 8) -> ExportPlan:
    """Trace a two-layer model of `cfg`'s widths at `tp` and extend it to `cfg.n_layers` layers."""
    check_tp(cfg, tp)
    traced = min(cfg.n_layers, 2)
    graph = rank_graph(dataclasses.replace(cfg, n_layers=traced), tp=tp, dtype=dtype, max_batch=max_batch)
    cuts = [c.model for c in partition(graph)]
    kinds = segment_kinds(len(cuts), traced)
    sized = [SegmentSize(kind, layer, _tensors(m)) for (kind, layer), m in zip(kinds, cuts)]
    if traced == 2 and _layer_sizes(sized, 0) != _layer_sizes(sized, 1):
        raise AssertionError("the two traced layers differ in their tensors; the plan cannot repeat them")
    if tp == 1:
        segments = (_repeat_layers(sized[0], traced, cfg.n_layers),)
    else:
        last = {s.kind: s for s in sized if s.layer == traced - 1}
        segments = (sized[0],) + tuple(
            _reindex(last[kind], traced - 1, i) for i in range(cfg.n_layers) for kind in ("attention", "ffn")
        ) + tuple(sized[-2:])
    kv = _kv_bytes_per_layer_token(graph) * cfg.n_layers
    return ExportPlan(cfg=cfg, tp=tp, dtype=dtype, segments=segments, kv_bytes_per_token=kv, max_batch=max_batch)


@dataclass(frozen=True)
class EngineMemory:
    """One TensorRT rank's GPU memory for one optimization profile, estimated before any build (TensorRT's
    own activation figure, `get_device_memory_size_for_profile_v2`, exists only once an engine is built).

    weights: the rank's graphs, as the export writes them. kv_cache: keys and values of every layer for
    `batch` rows of `capacity` slots (the runner allocates them once). activations: the largest segment's
    tensors at the profile's largest shape, each counted once without TensorRT's reuse (an upper bound),
    the boolean attention mask [B, 1, S, C] included, the attention scores not (IAttention is one fused
    kernel: `backends/tensorrt/lowering.py`); every execution context of the rank shares one buffer of this
    size (`backends/tensorrt/runner.py`)."""

    profile: str  # prefill | decode
    batch: int
    seq: int
    capacity: int
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        return (f"{self.profile} (batch {self.batch}, {self.seq} tokens, cache {self.capacity}): "
                f"{fmt_bytes(self.total)} = weights {fmt_bytes(self.weights)} + KV cache {fmt_bytes(self.kv_cache)} "
                f"+ activations {fmt_bytes(self.activations)}")


def engine_memory(cfg: ModelConfig, *, tp: int, dtype: Precision, weight_bytes: int, max_batch: int,
                  capacity: int) -> tuple[EngineMemory, EngineMemory]:
    """(prefill, decode) `EngineMemory` of one rank: profiles of `max_batch` rows, prefill up to
    `capacity` tokens (`backends/tensorrt/profiles.py`)."""
    shape = RankShape(cfg, tp, 0)
    e = dtype.torch_dtype.itemsize
    h, kv, d = shape.local_heads, shape.local_kv_heads, cfg.head_dim
    kv_cache = 2 * cfg.n_layers * max_batch * kv * capacity * d * e

    def activations(b: int, s: int) -> int:
        tokens = b * s
        attention = tokens * e * (3 * cfg.dim + (h + 2 * kv) * d + (h + kv) * d + h * d) + b * s * capacity
        ffn = tokens * e * (3 * cfg.dim + 3 * shape.local_hidden)
        head = b * e * cfg.dim + b * shape.local_vocab * 4
        return max(attention, ffn, head)

    return tuple(EngineMemory(name, max_batch, s, capacity, weight_bytes, kv_cache, activations(max_batch, s))
                 for name, s in (("prefill", capacity), ("decode", 1)))


def largest_fitting_capacity(cfg: ModelConfig, *, tp: int, dtype: Precision, weight_bytes: int,
                             max_batch: int, limit: int) -> int:
    """The largest cache capacity (at most max_seq_len; rounded down to a multiple of 256 from 256 on)
    whose prefill profile fits `limit` bytes at `max_batch` rows; 0 when none does."""
    best, lo, hi = 0, 1, cfg.max_seq_len
    while lo <= hi:  # the need grows with the capacity
        mid = (lo + hi) // 2
        prefill, _ = engine_memory(cfg, tp=tp, dtype=dtype, weight_bytes=weight_bytes, max_batch=max_batch,
                                   capacity=mid)
        if prefill.total <= limit:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best - best % 256 if best >= 256 else best


def check_engine_fits(cfg: ModelConfig, *, tp: int, dtype: Precision, weight_bytes: int, max_batch: int,
                      capacity: int, limit: int, limit_name: str) -> tuple[EngineMemory, EngineMemory]:
    """The rank's (prefill, decode) `EngineMemory`, or ConfigError (one line naming --max-batch and
    --max-seq-len, with values that fit) when the larger one needs more than `limit` bytes."""
    profiles = engine_memory(cfg, tp=tp, dtype=dtype, weight_bytes=weight_bytes, max_batch=max_batch,
                             capacity=capacity)
    worst = max(profiles, key=lambda m: m.total)
    if worst.total <= limit:
        return profiles
    fits = largest_fitting_capacity(cfg, tp=tp, dtype=dtype, weight_bytes=weight_bytes, max_batch=max_batch,
                                    limit=limit)
    one_row = largest_fitting_capacity(cfg, tp=tp, dtype=dtype, weight_bytes=weight_bytes, max_batch=1,
                                       limit=limit)
    if fits:
        way_out = f"use --max-seq-len {fits} or less at --max-batch {max_batch}, or a smaller --max-batch"
    elif one_row:
        way_out = f"use --max-batch 1 with --max-seq-len {one_row} or less"
    else:
        way_out = f"the weights alone ({fmt_bytes(weight_bytes)}) leave too little; use a larger --tp"
    raise ConfigError(f"a TensorRT rank needs {worst.describe()} but {limit_name} is {fmt_bytes(limit)}; {way_out}")


def format_engine_memory(plan: ExportPlan, *, max_batch: int, capacity: int) -> str:
    """The lines `llama-export plan` prints for one TensorRT rank of this plan."""
    lines = [f"TensorRT rank (--max-batch {max_batch}, --max-seq-len {capacity}), estimated:"]
    for m in engine_memory(plan.cfg, tp=plan.tp, dtype=plan.dtype, weight_bytes=plan.rank_bytes,
                           max_batch=max_batch, capacity=capacity):
        lines.append(f"  {m.describe()}")
    lines.append("  activations: the largest segment's tensors at the profile's largest shape, the [B, 1, S, C] "
                 "mask included; every execution context of the rank shares one buffer of that size")
    return "\n".join(lines)


def _tensors(model: ir.Model) -> tuple[TensorSize, ...]:
    return tuple(TensorSize(name, tuple(v.const_value.shape), v.const_value.nbytes)
                 for name, v in model.graph.initializers.items())


def _layer_sizes(segments: list[SegmentSize], layer: int) -> list[tuple[str, str, int]]:
    """(segment kind, tensor name without the layer index, bytes) of one traced layer."""
    return sorted((s.kind, t.name.split(".", 2)[2], t.nbytes) for s in segments for t in s.tensors
                  if t.name.startswith(f"layers.{layer}."))


def _reindex(seg: SegmentSize, src: int, dst: int) -> SegmentSize:
    tensors = tuple(dataclasses.replace(t, name=t.name.replace(f"layers.{src}.", f"layers.{dst}.", 1))
                    for t in seg.tensors)
    return SegmentSize(seg.kind, dst, tensors)


def _repeat_layers(seg: SegmentSize, traced: int, n_layers: int) -> SegmentSize:
    """The one TP=1 graph: its non-layer tensors, then the last traced layer's tensors per layer."""
    top = [t for t in seg.tensors if not _LAYER.match(t.name)]
    last = SegmentSize(seg.kind, None, tuple(t for t in seg.tensors if t.name.startswith(f"layers.{traced - 1}.")))
    per_layer = [t for i in range(n_layers) for t in _reindex(last, traced - 1, i).tensors]
    return SegmentSize(seg.kind, None, tuple(top + per_layer))


def _kv_bytes_per_layer_token(model: ir.Model) -> int:
    """Bytes of past_key_0 + past_value_0 per token: the static dims (kv_heads, head_dim) x element size."""
    total = 0
    for v in model.graph.inputs:
        if v.name in ("past_key_0", "past_value_0"):
            n = v.dtype.itemsize
            for d in v.shape:
                n *= d if isinstance(d, int) else 1
            total += n
    return total


_UNITS = ("TiB", "GiB", "MiB", "KiB")


def fmt_bytes(n: float) -> str:
    """'2.50 GiB': the largest binary unit of pydantic's `ByteSize` (what `--memory-limit` is parsed
    with) that `n` reaches, up to TiB, with two decimals where `ByteSize.human_readable` shows one: a
    refusal close to the limit must not print need and limit as the same number."""
    size = ByteSize(round(n))
    unit = next((u for u in _UNITS if abs(size) >= ByteSize.byte_sizes[u.lower()]), None)
    return f"{size} B" if unit is None else f"{size.to(unit):.2f} {unit}"


def format_plan(plan: ExportPlan) -> str:
    """The per-rank table and the segment summary `llama-export plan` prints."""
    c = plan.cfg
    big = plan.largest_tensor
    lines = [
        f"model: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} KV heads (head_dim "
        f"{c.head_dim}), ffn {c.hidden_dim}, vocab {c.vocab_size}, context {c.max_seq_len}: "
        f"{c.num_parameters() / 1e9:.2f}B parameters",
        f"export: tp={plan.tp}, {plan.dtype.value}, {fmt_bytes(plan.rank_bytes * plan.tp)} of graphs in all",
        "",
        f"{'rank':>4}  {'weights':>10}  {'graphs':>10}  {'segments':>8}  {'largest tensor':<34}  "
        f"{'KV/token':>10}  {'KV@ctx':>10}  {'export ≤':>10}  {'run ≥':>10}",
    ]
    tensor = f"{big.name} {fmt_bytes(big.nbytes)}"
    for r in range(plan.tp):
        lines.append(
            f"{r:>4}  {fmt_bytes(plan.weight_bytes):>10}  {fmt_bytes(plan.rank_bytes):>10}  {len(plan.segments):>8}  "
            f"{tensor:<34}  {fmt_bytes(plan.kv_bytes_per_token):>10}  {fmt_bytes(plan.kv_bytes_at_limit):>10}  "
            f"{fmt_bytes(plan.export_target_bytes):>10}  {fmt_bytes(plan.run_bytes):>10}")
    lines += ["", "segments of each rank:", f"  {'kind':<10} {'count':>5}  {'bytes each':>11}  tensors over 1 KiB"]
    kinds: dict[str, list[SegmentSize]] = {}
    for s in plan.segments:
        kinds.setdefault(s.kind, []).append(s)
    for kind, segs in kinds.items():
        names = sorted({_LAYER.sub("layers.N.", t.name) for t in segs[0].tensors if t.nbytes > 1024})
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} names)" if len(names) > 6 else "")
        lines.append(f"  {kind:<10} {len(segs):>5}  {fmt_bytes(segs[0].nbytes):>11}  {shown or '-'}")
    lines += ["",
              "weights: the rank's weight slices. graphs: its files (weights + the fp32 RoPE tables, which each "
              "segment applying RoPE carries). KV@ctx: one sequence at the context limit. export ≤: the export "
              "memory target (2 GiB + 2x the largest tensor). run ≥: graphs + KV@ctx, before activations."]
    return "\n".join(lines)
