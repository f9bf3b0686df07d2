"""`llama-export compare`: a backend and the eager model side by side, segment by segment.

Both run every rank of the export in one process (`ThreadGroup`, real data exchange between rank
threads), on the same prompt, teacher-forced with eager's greedy tokens. After each segment the
backend's boundary tensor is compared with the eager tensor at the same place:

    segment kind        backend value                      eager value (module output, same rank)
    embed               AllGather output                   tok_embeddings
    layers.i.attention  AllReduce output, present k/v      layers.i.attention.wo, cache i
    layers.i.ffn        AllReduce output                   layers.i.feed_forward.w2
    head                AllGather input (local logits)     output
    tail                logits                             logits

The first segment whose relative error (max abs / max |eager|) exceeds the dtype's threshold is where
the error starts: a corrupted weight in layer 3's FFN shows up first at `layers.3.ffn`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llama_export.compare import LOGITS_ATOL, Comparison, TensorDiff
from llama_export.config import Backend
from llama_export.errors import InputError
from llama_export.export.manifest import Manifest, Segment
from llama_export.model.checkpoint import build_model, load_config
from llama_export.parallel.comm import ThreadGroup
from llama_export.runner.stitch import segmented_step

log = logging.getLogger(__name__)

# Relative error (max abs / max |reference|) above which a segment is said to diverge.
DIVERGENCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


@dataclass
class SegmentDiff:
    rank: int
    index: int
    label: str  # "layers.3.ffn"
    depth: float  # position along the model: embed 0, layer i attention i + 0.5, ffn i + 1, head L + 1
    diff: TensorDiff
    rel: float
    kv: TensorDiff | None = None  # present key/value of an attention segment (worse of the two)
    kv_rel: float = 0.0


@dataclass
class CompareReport:
    comparison: Comparison
    segments: list[SegmentDiff] = field(default_factory=list)  # prefill step, every rank
    threshold: float = 0.0

    def first_divergence(self) -> SegmentDiff | None:
        for s in sorted(self.segments, key=lambda s: (s.index, s.rank)):
            if max(s.rel, s.kv_rel) > self.threshold:
                return s
        return None

    def to_json(self) -> dict:
        first = self.first_divergence()
        return {
            "label": self.comparison.label,
            "pass": bool(self.comparison),
            "tolerance": self.comparison.tolerance,
            "logits": [vars(d) for d in self.comparison.logits],
            "greedy_agreement": self.comparison.tokens_agree,
            "divergence_threshold": self.threshold,
            "first_divergence": None if first is None else {"segment": first.label, "rank": first.rank},
            "segments": [{"rank": s.rank, "index": s.index, "segment": s.label, "rel": s.rel, **vars(s.diff),
                          "kv": vars(s.kv) if s.kv else None} for s in self.segments],
        }


def _label(seg: Segment) -> str:
    return seg.kind if seg.layer is None else f"layers.{seg.layer}.{seg.kind}"


def _depth(seg: Segment, n_layers: int) -> float:
    if seg.layer is not None:
        return seg.layer + (0.5 if seg.kind == "attention" else 1.0)
    return {"embed": 0.0, "full": float(n_layers), "head": n_layers + 1.0, "tail": n_layers + 1.5}[seg.kind]


def _eager_module(seg: Segment) -> str | None:
    return {"embed": "tok_embeddings", "attention": f"layers.{seg.layer}.attention.wo",
            "ffn": f"layers.{seg.layer}.feed_forward.w2", "head": "output"}.get(seg.kind)


def _backend_value(seg: Segment, env: dict[str, Tensor]) -> Tensor:
    c = seg.collective
    if seg.kind == "head":
        return env[c.input]  # local (pre-gather) logits, like eager's `output` module on this rank
    if c is not None:
        return env[c.output]
    return env["logits"]


def run_compare(artifacts: Path, backend: Backend, manifest: Manifest, checkpoint: Path, *, steps: int = 8,
                batch: int = 1, prompt: Tensor | None = None, seed: int = 0) -> CompareReport:
    from llama_export.runner.steps import open_backend

    cfg = manifest.model
    if load_config(checkpoint, max_seq_len=cfg.max_seq_len) != cfg:
        raise InputError(f"{checkpoint} does not hold the model of this export ({manifest.model_name}); "
                         "pass the checkpoint it was exported from with --checkpoint")
    if prompt is None:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, cfg.vocab_size, (batch, 8), generator=g)
    dtype = manifest.dtype.torch_dtype
    threshold = DIVERGENCE[manifest.dtype.value]

    def rank_fn(rank: int, comm):
        segments = manifest.rank(rank).segments
        # Eager, same rank and TP degree, capturing module outputs at the segment boundaries.
        model = build_model(checkpoint, tp=manifest.tp, rank=rank, comm=comm, dtype=dtype,
                            max_seq_len=cfg.max_seq_len)
        captured: dict[str, Tensor] = {}
        hooks = []
        for seg in segments:
            name = _eager_module(seg)
            if name is not None:
                mod = model.get_submodule(name)
                hooks.append(mod.register_forward_hook(
                    lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())))
        be = open_backend(backend, manifest, artifacts, rank=rank, device=torch.device("cpu"))
        env_by_step: list[dict[int, dict[str, Tensor]]] = []
        cur: dict[int, dict[str, Tensor]] = {}
        step, (bk, bv), _ = segmented_step(manifest, be, comm=comm, batch=prompt.shape[0],
                                           hook=lambda k, env: cur.__setitem__(k, dict(env)))
        ek, ev = model.empty_cache(prompt.shape[0])
        eager_logits, backend_logits, tokens, seg_diffs = [], [], prompt, []
        with torch.inference_mode():
            for i in range(steps + 1):
                captured.clear()
                cur.clear()
                elog, ek, ev = model(tokens, ek, ev)
                blog, bk, bv = step(tokens, bk, bv)
                eager_logits.append(elog)
                backend_logits.append(blog)
                if i == 0:  # per-segment diffs of the prefill (the longest, most informative step)
                    for k, seg in enumerate(segments):
                        ref = elog if seg.kind in ("tail", "full") else captured[_eager_module(seg)]
                        got = _backend_value(seg, cur[k])
                        d = TensorDiff.of(_label(seg), got, ref)
                        rel = d.max_abs / max(ref.abs().max().item(), 1e-12)
                        kv, kv_rel = None, 0.0
                        if seg.layer is not None and seg.kind == "attention":
                            pairs = [(cur[k][f"present_{w}_{seg.layer}"], ref_kv[seg.layer])
                                     for w, ref_kv in (("key", ek), ("value", ev))]
                            diffs = [(TensorDiff.of(f"present kv {seg.layer}", a, b),
                                      max(b.abs().max().item(), 1e-12)) for a, b in pairs]
                            kv, scale = max(diffs, key=lambda x: x[0].max_abs / x[1])
                            kv_rel = kv.max_abs / scale
                        seg_diffs.append(
                            SegmentDiff(rank, k, _label(seg), _depth(seg, cfg.n_layers), d, rel, kv, kv_rel))
                tokens = elog.argmax(-1, keepdim=True)  # teacher forcing with eager's greedy token
        for h in hooks:
            h.remove()
        be.close()
        return eager_logits, backend_logits, seg_diffs

    results = ThreadGroup(manifest.tp).run(rank_fn)
    eager_logits, backend_logits, _ = results[0]
    cmp = Comparison(label=f"{manifest.variant} {backend.value} vs eager", tolerance=LOGITS_ATOL[manifest.dtype.value])
    agree = 0
    for i, (b, e) in enumerate(zip(backend_logits, eager_logits)):
        cmp.logits.append(TensorDiff.of(f"step {i} logits", b, e, logits=True))
        agree += int(torch.equal(b.argmax(-1), e.argmax(-1)))
    cmp.tokens_agree = agree / len(eager_logits)
    report = CompareReport(comparison=cmp, threshold=threshold)
    for _, _, segs in results:
        report.segments.extend(segs)
    return report


def format_report(report: CompareReport) -> str:
    lines = [f"{'rank':>4} {'segment':<22} {'max abs':>10} {'mean abs':>10} {'rel':>9} {'cosine':>10} {'kv max abs':>10}"]
    for s in sorted(report.segments, key=lambda s: (s.index, s.rank)):
        kv = f"{s.kv.max_abs:10.2e}" if s.kv else f"{'-':>10}"
        flag = "  <-- diverges" if s is report.first_divergence() else ""
        lines.append(f"{s.rank:>4} {s.label:<22} {s.diff.max_abs:10.2e} {s.diff.mean_abs:10.2e} {s.rel:9.2e} "
                     f"{s.diff.cosine:10.6f} {kv}{flag}")
    c = report.comparison
    w = max(c.logits, key=lambda d: d.max_abs)
    lines.append(f"final logits over {len(c.logits)} steps: max abs {c.max_abs:.2e} (worst at {w.name}), "
                 f"min cosine {c.min_cosine:.6f}, top-1 {c.top1:.3f}, "
                 f"top-5 {sum(d.top5 for d in c.logits) / len(c.logits):.3f}, greedy agreement {c.tokens_agree:.3f}")
    first = report.first_divergence()
    lines.append(f"error starts at: {first.label} (rank {first.rank})" if first
                 else f"no segment exceeds the relative-error threshold {report.threshold:.0e}")
    lines.append(str(c))
    return "\n".join(lines)


def plot_report(report: CompareReport, path: Path) -> None:
    """PNG of max abs error against depth, one line per rank (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ranks = sorted({s.rank for s in report.segments})
    for r in ranks:
        segs = sorted((s for s in report.segments if s.rank == r), key=lambda s: s.index)
        ax.plot([s.depth for s in segs], [max(s.diff.max_abs, 1e-12) for s in segs], marker="o", label=f"rank {r}")
    first = report.first_divergence()
    if first is not None:
        ax.axvline(first.depth, color="red", linestyle="--", label=f"error starts: {first.label}")
    ax.set_yscale("log")
    ax.set_xlabel("depth (layer; attention at +0.5, FFN at +1)")
    ax.set_ylabel("max abs error vs eager")
    ax.set_title(report.comparison.label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(report: CompareReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2))
