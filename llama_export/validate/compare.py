"""The comparison engine: a backend and the eager model side by side, on the same prompt.

The backend runs every rank of the export in one process (`ThreadGroup`, real data exchange between
rank threads) over a prefill and `steps` greedy decode steps, teacher-forced with the reference's
greedy tokens (one early token flip can neither hide nor inflate the error of every later step;
greedy agreement is reported separately). Two modes:

    Mode.VALIDATE  reference: the eager model at TP=1 (independent of the tensor-parallel code);
                   judged: the final logits of every step. What `export` runs after writing.
    Mode.LOCATE    reference: the eager model at the same rank and TP degree, in the same thread,
                   so that every segment boundary has a reference value too. What `llama-export
                   compare` runs to say where an error starts:

    segment kind        backend value                      eager value (module output, same rank)
    embed               AllGather output                   tok_embeddings
    layers.i.attention  AllReduce output, present k/v      layers.i.attention.wo, cache i
    layers.i.ffn        AllReduce output                   layers.i.feed_forward.w2
    head                AllGather input (local logits)     output
    tail                logits                             logits

For a quantized export both references are the eager model with the same weights quantized and
dequantized (`build_model(weights=...)`), and the backend computes them exactly as the graph says
(`open_backend(exact=True)`), so the fp tolerances of the activation dtype apply.

A TP=1 export is one graph: there the same module outputs are read from inside it, as extra ONNX
Runtime outputs (`full_graph_probes`). The first probe whose relative error (max abs / max |eager|)
exceeds the dtype's threshold is where the error starts: a corrupted weight in layer 3's FFN shows up
first at `layers.3.ffn`.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llama_export.artifact import schema
from llama_export.artifact.manifest import Manifest, Segment
from llama_export.backends import open_backend
from llama_export.config import Backend, ModelConfig
from llama_export.errors import InputError
from llama_export.files import staged_dir, write_atomic, write_json as write_json_file
from llama_export.model.checkpoint import build_model, load_config
from llama_export.parallel.comm import ThreadGroup
from llama_export.progress import activity, count_bar
from llama_export.validate import polygraphy_data
from llama_export.tolerances import TOLERANCES
from llama_export.validate.settings import VALIDATION, CompareSettings
from llama_export.validate.diff import Comparison, TensorDiff, nan_first
from llama_export.engine.generate import generate, validate_prompt
from llama_export.runner.step import host
from llama_export.runner.stitch import backend_capacity, empty_cache, segmented_step

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    VALIDATE = "validate"
    LOCATE = "locate"




def check_settings(settings: CompareSettings, cfg: ModelConfig, *, prompt_len: int | None = None) -> None:
    """The prompt and `settings.steps + 1` generated tokens fit the model's context."""
    n = settings.prompt_len if prompt_len is None else prompt_len
    need = n + settings.steps + 1
    if need > cfg.max_seq_len:
        raise InputError(
            f"--steps {settings.steps}: the prompt ({n} tokens) and {settings.steps + 1} generated tokens need "
            f"{need} positions but the context is max_seq_len={cfg.max_seq_len}; "
            + (f"use --steps {cfg.max_seq_len - n - 1} or fewer" if cfg.max_seq_len - n - 1 >= 1
               else "shorten the prompt")
        )


@dataclass
class SegmentDiff:
    rank: int
    index: int  # position of the probe along the model (its order in `probes_for`)
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
            if not (s.rel <= self.threshold and s.kv_rel <= self.threshold):  # a NaN error diverges
                return s
        return None

    def to_json(self) -> dict:
        """The report as JSON values; a NaN or infinite error is null (JSON has neither)."""
        first = self.first_divergence()
        return _finite_or_null({
            "label": self.comparison.label,
            "pass": bool(self.comparison),
            "tolerance": self.comparison.tolerance,
            "logits": [vars(d) for d in self.comparison.logits],
            "greedy_agreement": self.comparison.tokens_agree,
            "divergence_threshold": self.threshold,
            "first_divergence": None if first is None else {"segment": first.label, "rank": first.rank},
            "segments": [{"rank": s.rank, "index": s.index, "segment": s.label, "rel": s.rel, **vars(s.diff),
                          "kv": vars(s.kv) if s.kv else None} for s in self.segments],
        })

    def __bool__(self) -> bool:
        return bool(self.comparison)


def _finite_or_null(value):
    """`value` (JSON-like nesting) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


@dataclass(frozen=True)
class Probe:
    """One place where backend and eager are compared."""

    label: str  # "layers.3.ffn"
    depth: float  # embed 0, layer i attention i + 0.5, ffn i + 1, head L + 1, logits L + 1.5
    segment: int  # index of the segment whose run produces the value
    value: str  # backend value name in the runner's environment
    module: str | None  # eager module whose output is the reference (None: the final logits)
    kv_layer: int | None = None  # also compare this layer's present key/value


def _segment_probe(k: int, seg: Segment, n_layers: int) -> Probe:
    c = seg.collective
    if seg.kind == "embed":
        return Probe("embed", 0.0, k, c.output, "tok_embeddings")
    if seg.kind == "attention":
        return Probe(f"layers.{seg.layer}.attention", seg.layer + 0.5, k, c.output,
                     f"layers.{seg.layer}.attention.wo", seg.layer)
    if seg.kind == "ffn":
        return Probe(f"layers.{seg.layer}.ffn", seg.layer + 1.0, k, c.output, f"layers.{seg.layer}.feed_forward.w2")
    if seg.kind == "head":
        # local (pre-gather) logits, like eager's `output` module on this rank
        return Probe("head", n_layers + 1.0, k, c.input, "output")
    return Probe("tail", n_layers + 1.5, k, schema.LOGITS, None)


def full_graph_probes(k: int, n_layers: int) -> list[Probe]:
    """Probes inside a TP=1 ('full') graph: the same module outputs, read as extra graph outputs
    (the naming pass makes their names predictable)."""
    probes = [Probe("embed", 0.0, k, "/model/tok_embeddings/Gather_output_0", "tok_embeddings")]
    for i in range(n_layers):
        probes += [
            Probe(f"layers.{i}.attention", i + 0.5, k, f"/model/layers.{i}/attention/wo/MatMul_output_0",
                  f"layers.{i}.attention.wo", i),
            Probe(f"layers.{i}.ffn", i + 1.0, k, f"/model/layers.{i}/feed_forward/w2/MatMul_output_0",
                  f"layers.{i}.feed_forward.w2"),
        ]
    return probes + [Probe("head", n_layers + 1.0, k, "/model/output/MatMul_output_0", "output"),
                     Probe("logits", n_layers + 1.5, k, schema.LOGITS, None)]


def probes_for(segments: tuple[Segment, ...], n_layers: int) -> list[Probe]:
    out: list[Probe] = []
    for k, seg in enumerate(segments):
        out += full_graph_probes(k, n_layers) if seg.kind == "full" else [_segment_probe(k, seg, n_layers)]
    return out


def compare(artifacts: Path, backend: Backend, manifest: Manifest, checkpoint: Path, *, mode: Mode,
            settings: CompareSettings = CompareSettings(), prompt: Tensor | None = None,
            device: str = "cpu", polygraphy: Path | None = None, progress: bool = False) -> CompareReport:
    """Backend (on `device`; eager always on the CPU) against eager; see the module docstring.

    `polygraphy` (LOCATE only): also save each segment's prefill feeds and eager references there, in
    Polygraphy's formats (`polygraphy_data.py`). `progress`: show the eager reference and the backend's
    steps as they run (stderr, on a terminal).
    """
    if polygraphy is not None and mode is not Mode.LOCATE:
        raise ValueError("Polygraphy segment files need the per-rank eager reference of Mode.LOCATE")
    cfg = manifest.model
    if load_config(checkpoint, max_seq_len=cfg.max_seq_len) != cfg:
        raise InputError(f"{checkpoint} does not hold the model of this export ({manifest.model_name}); "
                         "pass the checkpoint it was exported from with --checkpoint")
    if prompt is None:
        prompt = settings.random_prompt(cfg.vocab_size)
    check_settings(settings, cfg, prompt_len=prompt.shape[1])
    validate_prompt(prompt, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, max_new_tokens=settings.steps + 1)
    dtype = manifest.dtype.torch_dtype
    tolerance = TOLERANCES[manifest.dtype]
    bsz, capacity = prompt.shape[0], prompt.shape[1] + settings.steps + 1
    t0 = time.perf_counter()
    forced: list[Tensor] | None = None
    ref_logits: list[Tensor] = []
    if mode is Mode.VALIDATE:
        with activity(f"{manifest.variant}: eager reference, prefill + {settings.steps} steps", enabled=progress):
            model = build_model(checkpoint, dtype=dtype, max_seq_len=cfg.max_seq_len, weights=manifest.weight_quant)
            res = generate(model.step, prompt, model.empty_cache(prompt.shape[0], capacity),
                           max_new_tokens=settings.steps + 1)
        ref_logits = [torch.from_numpy(s.logits) for s in res.steps]
        forced = [torch.from_numpy(s.tokens) for s in res.steps]
        del model
    bar = count_bar(settings.steps + 1, f"{manifest.variant}: {backend.value}, all ranks", unit="step",
                    enabled=progress)

    dump = None

    def rank_fn(rank: int, comm):
        segments = manifest.rank(rank).segments
        probes = probes_for(segments, cfg.n_layers) if mode is Mode.LOCATE else []
        model = captured = None
        recorder = polygraphy_data.CollectiveRecorder(comm)
        if mode is Mode.LOCATE:
            # Eager, same rank and TP degree, capturing module outputs where the probes read the backend.
            model = build_model(checkpoint, tp=manifest.tp, rank=rank, comm=recorder, dtype=dtype,
                                max_seq_len=cfg.max_seq_len, weights=manifest.weight_quant)
            captured = {}
            for p in probes:
                if p.module is not None:
                    model.get_submodule(p.module).register_forward_hook(
                        lambda _m, _i, out, name=p.module: captured.__setitem__(name, out.detach()))
        extra = tuple(p.value for p in probes if p.value.startswith("/model/"))
        # exact: quantized weights computed as the canonical graph says, so the comparison judges the
        # export itself (ORT's faster int8-activation kernels are measured by `eval` and the tests).
        be = open_backend(backend, manifest, artifacts, rank=rank, device=device, threads=torch.get_num_threads(),
                          extra_outputs=extra, exact=True)
        cur: dict[int, dict[str, Tensor]] = {}
        step = segmented_step(manifest, be, comm=comm, hook=lambda k, env: cur.__setitem__(k, dict(env)))
        bk, bv = empty_cache(manifest, rank, bsz, backend_capacity(backend, manifest, capacity), backend=be)
        if model is not None:
            ek, ev = model.empty_cache(bsz, capacity)
        backend_logits, eager_logits, seg_diffs, tokens = [], [], [], prompt
        cached = torch.zeros(bsz, dtype=torch.int64)
        lengths = torch.full((bsz,), prompt.shape[1], dtype=torch.int64)
        with torch.inference_mode():
            for i in range(settings.steps + 1):
                cur.clear()
                blog, bk, bv = step(tokens, cached, lengths, bk, bv)
                backend_logits.append(torch.from_numpy(host(blog)))
                if rank == 0:
                    bar.update()
                if model is None:
                    tokens = forced[i].unsqueeze(1)
                else:
                    captured.clear()
                    recorder.inputs.clear()
                    elog, ek, ev = model(tokens, cached, lengths, ek, ev)
                    eager_logits.append(elog)
                    if i == 0:  # per-probe diffs of the prefill (the longest, most informative step)
                        seg_diffs = _probe_diffs(rank, probes, cur, captured, elog, ek, ev, int(lengths[0]))
                        if dump is not None:
                            dump.add_rank(rank, cur, polygraphy_data.eager_references(
                                segments, recorder.inputs, elog, ek, ev))
                    tokens = elog.argmax(-1, keepdim=True)  # teacher forcing with eager's greedy token
                cached, lengths = cached + lengths, torch.ones_like(lengths)
        be.close()
        return backend_logits, eager_logits, seg_diffs

    with contextlib.ExitStack() as stack, bar:
        if polygraphy is not None:
            dump = polygraphy_data.SegmentDump(stack.enter_context(staged_dir(polygraphy)), manifest, artifacts)
        results = ThreadGroup(manifest.tp).run(rank_fn)
        if dump is not None:
            dump.finish(polygraphy)
    backend_logits, eager_logits, _ = results[0]
    reference = ref_logits if mode is Mode.VALIDATE else eager_logits
    cmp = Comparison(label=f"{manifest.variant} {backend.value} vs eager", tolerance=tolerance.logits_atol)
    agree = 0
    for i, (b, e) in enumerate(zip(backend_logits, reference)):
        cmp.logits.append(TensorDiff.of(f"step {i} logits", b, e, logits=True))
        agree += int(torch.equal(b.argmax(-1), e.argmax(-1)))
    cmp.tokens_agree = agree / len(reference)
    cmp.seconds = time.perf_counter() - t0
    report = CompareReport(comparison=cmp, threshold=tolerance.divergence_rel)
    for _, _, segs in results:
        report.segments.extend(segs)
    return report


def _probe_diffs(rank: int, probes: list[Probe], cur: dict[int, dict[str, Tensor]], captured: dict[str, Tensor],
                 elog: Tensor, ek: list[Tensor], ev: list[Tensor], filled: int) -> list[SegmentDiff]:
    """Diffs at every probe; caches are compared on their `filled` written slots (the rest of the
    capacity is unspecified by the contract)."""
    out = []
    for n, p in enumerate(probes):
        env = cur[p.segment]
        if p.value not in env:
            continue  # this backend cannot expose values inside a graph (TensorRT)
        ref = elog if p.module is None else captured[p.module]
        d = TensorDiff.of(p.label, env[p.value], ref)
        rel = d.max_abs / max(ref.abs().max().item(), 1e-12)
        kv, kv_rel = None, 0.0
        if p.kv_layer is not None:
            pairs = [(env[schema.present_key(p.kv_layer)][:, :, :filled], ek[p.kv_layer][:, :, :filled]),
                     (env[schema.present_value(p.kv_layer)][:, :, :filled], ev[p.kv_layer][:, :, :filled])]
            diffs = [(TensorDiff.of(f"present kv {p.kv_layer}", a, b), max(b.abs().max().item(), 1e-12))
                     for a, b in pairs]
            kv, scale = max(diffs, key=lambda x: nan_first(x[0].max_abs / x[1]))
            kv_rel = kv.max_abs / scale
        out.append(SegmentDiff(rank, n, p.label, p.depth, d, rel, kv, kv_rel))
    return out


def validate_export(export_dir: Path, checkpoint: Path, *, backend: Backend = Backend.ORT,
                    settings: CompareSettings = VALIDATION, progress: bool = False) -> Comparison:
    """Export validation: `compare` in `Mode.VALIDATE` on the export's own manifest."""
    from llama_export.artifact.manifest import load_manifest

    report = compare(export_dir, backend, load_manifest(export_dir), checkpoint, mode=Mode.VALIDATE,
                     settings=settings, progress=progress)
    return report.comparison


def format_report(report: CompareReport) -> str:
    first = report.first_divergence()
    lines = [f"{'rank':>4} {'segment':<22} {'max abs':>10} {'mean abs':>10} {'rel':>9} {'cosine':>10} {'kv max abs':>10}"]
    for s in sorted(report.segments, key=lambda s: (s.index, s.rank)):
        kv = f"{s.kv.max_abs:10.2e}" if s.kv else f"{'-':>10}"
        flag = "  <-- diverges" if s is first else ""
        lines.append(f"{s.rank:>4} {s.label:<22} {s.diff.max_abs:10.2e} {s.diff.mean_abs:10.2e} {s.rel:9.2e} "
                     f"{s.diff.cosine:10.6f} {kv}{flag}")
    c = report.comparison
    w = c.worst()
    lines.append(f"final logits over {len(c.logits)} steps: max abs {c.max_abs:.2e} (worst at {w.name}), "
                 f"min cosine {c.min_cosine:.6f}, top-1 {c.top1:.3f}, "
                 f"top-5 {sum(d.top5 for d in c.logits) / len(c.logits):.3f}, greedy agreement {c.tokens_agree:.3f}")
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def write_json(report: CompareReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_file(path, report.to_json(), indent=2)
