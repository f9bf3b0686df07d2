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
import functools
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llama_export.artifact import schema
from llama_export.artifact.manifest import Segment
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
from llama_export.engine.batch import generate
from llama_export.engine.generate import validate_prompt
from llama_export.runner.source import ModelSource, ResolvedSource
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


def compare(source: ResolvedSource, settings: CompareSettings = CompareSettings(), *, mode: Mode,
            prompt: Tensor | None = None, device: str = "cpu", polygraphy: Path | None = None,
            progress: bool = False) -> CompareReport:
    """The export or engines of `source` (on `device`; eager always on the CPU, from the checkpoint of
    `source`) against eager; see the module docstring. Every rank's files are verified first.

    `prompt`: [B, S] token ids (default: `settings.random_prompt`). `polygraphy` (LOCATE only): also
    save each segment's prefill feeds and eager references there, in Polygraphy's formats
    (`polygraphy_data.py`). `progress`: show the eager reference and the backend's steps as they run
    (stderr, on a terminal).
    """
    if polygraphy is not None and mode is not Mode.LOCATE:
        raise ValueError("Polygraphy segment files need the per-rank eager reference of Mode.LOCATE")
    _check_checkpoint(source)
    prompt = _checked_prompt(source.manifest.model, settings, prompt)
    source.verify(range(source.manifest.tp))  # this process opens every rank's files
    t0 = time.perf_counter()
    forced = reference = None
    if mode is Mode.VALIDATE:
        reference, forced = _eager_reference(source, settings, prompt, progress=progress)
    results = _run_ranks(source, settings, prompt, mode=mode, forced=forced, device=device,
                         polygraphy=polygraphy, progress=progress)
    return _judge(source, results, reference if reference is not None else results[0].eager_logits, t0=t0)


def _check_checkpoint(source: ResolvedSource) -> None:
    """The checkpoint of `source` holds the model of its export."""
    m = source.manifest
    if load_config(source.checkpoint_dir, max_seq_len=m.model.max_seq_len) != m.model:
        raise InputError(f"{source.checkpoint_dir} does not hold the model of this export ({m.model_name}); "
                         "pass the checkpoint it was exported from with --checkpoint")


def _checked_prompt(cfg: ModelConfig, settings: CompareSettings, prompt: Tensor | None) -> Tensor:
    """`prompt` (default: the seeded random prompt of `settings`), checked against the model."""
    if prompt is None:
        prompt = settings.random_prompt(cfg.vocab_size)
    check_settings(settings, cfg, prompt_len=prompt.shape[1])
    validate_prompt(prompt, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, max_new_tokens=settings.steps + 1)
    return prompt


def _eager_reference(source: ResolvedSource, settings: CompareSettings, prompt: Tensor, *,
                     progress: bool) -> tuple[list[Tensor], list[Tensor]]:
    """VALIDATE's reference: the TP=1 eager model's logits and greedy tokens, one of each per step."""
    m = source.manifest
    with activity(f"{m.variant}: eager reference, prefill + {settings.steps} steps", enabled=progress):
        model = build_model(source.checkpoint_dir, cfg=m.model, dtype=m.dtype.torch_dtype, weights=m.weight_quant)
        res = generate(model.step, prompt, model.empty_cache(prompt.shape[0], prompt.shape[1] + settings.steps + 1),
                       max_new_tokens=settings.steps + 1)
    return [torch.from_numpy(s.logits) for s in res.steps], [torch.from_numpy(s.tokens) for s in res.steps]


@dataclass(frozen=True)
class _Run:
    """What the rank threads of one comparison share (read only)."""

    source: ResolvedSource
    mode: Mode
    prompt: Tensor  # [B, S]
    steps: int  # prefill + decode steps
    forced: list[Tensor] | None  # VALIDATE: the reference's greedy tokens, fed to the backend step by step
    device: str
    bar: object  # progress bar of rank 0's steps
    dump: polygraphy_data.SegmentDump | None

    @property
    def capacity(self) -> int:
        return self.prompt.shape[1] + self.steps


@dataclass
class _RankResult:
    backend_logits: list[Tensor] = field(default_factory=list)  # per step
    eager_logits: list[Tensor] = field(default_factory=list)  # per step (LOCATE)
    segments: list[SegmentDiff] = field(default_factory=list)  # per probe, prefill (LOCATE)


def _run_ranks(source: ResolvedSource, settings: CompareSettings, prompt: Tensor, *, mode: Mode,
               forced: list[Tensor] | None, device: str, polygraphy: Path | None,
               progress: bool) -> list[_RankResult]:
    """Every rank of the export, each in its own thread (`ThreadGroup`), over the prefill and the steps."""
    m = source.manifest
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(count_bar(settings.steps + 1, f"{m.variant}: {source.backend.value}, all ranks",
                                            unit="step", enabled=progress))
        dump = None
        if polygraphy is not None:
            dump = polygraphy_data.SegmentDump(stack.enter_context(staged_dir(polygraphy)), m, source.artifacts)
        run = _Run(source, mode, prompt, settings.steps + 1, forced, device, bar, dump)
        results = ThreadGroup(m.tp).run(functools.partial(_compare_rank, run))
        if dump is not None:
            dump.finish(polygraphy)
    return results


def _compare_rank(run: _Run, rank: int, comm) -> _RankResult:
    """One rank thread: its backend (and, in LOCATE, the eager model at this rank) step by step."""
    m = run.source.manifest
    probes = probes_for(m.rank(rank).segments, m.model.n_layers) if run.mode is Mode.LOCATE else []
    eager = _EagerRank(run, rank, comm, probes) if run.mode is Mode.LOCATE else None
    extra = tuple(p.value for p in probes if p.value.startswith("/model/"))
    # exact: quantized weights computed as the canonical graph says, so the comparison judges the
    # export itself (ORT's faster int8-activation kernels are measured by `eval` and the tests).
    with open_backend(run.source.backend, m, run.source.artifacts, rank=rank, device=run.device,
                      threads=torch.get_num_threads(), extra_outputs=extra, exact=True) as be:
        return _lockstep(run, rank, comm, be, probes, eager)


class _EagerRank:
    """LOCATE's reference: the eager model at the same rank and TP degree, capturing the module
    outputs where the probes read the backend, and the tensors its collectives receive."""

    def __init__(self, run: _Run, rank: int, comm, probes: list[Probe]) -> None:
        m = run.source.manifest
        self.recorder = polygraphy_data.CollectiveRecorder(comm)
        self.model = build_model(run.source.checkpoint_dir, cfg=m.model, tp=m.tp, rank=rank, comm=self.recorder,
                                 dtype=m.dtype.torch_dtype, weights=m.weight_quant)
        self.captured: dict[str, Tensor] = {}
        for p in probes:
            if p.module is not None:
                self.model.get_submodule(p.module).register_forward_hook(
                    lambda _m, _i, out, name=p.module: self.captured.__setitem__(name, out.detach()))
        self.keys, self.values = self.model.empty_cache(run.prompt.shape[0], run.capacity)

    def __call__(self, tokens: Tensor, cached: Tensor, lengths: Tensor) -> Tensor:
        """One step; returns the logits (the cache is kept here)."""
        self.captured.clear()
        self.recorder.inputs.clear()
        logits, self.keys, self.values = self.model(tokens, cached, lengths, self.keys, self.values)
        return logits


def _lockstep(run: _Run, rank: int, comm, be, probes: list[Probe], eager: _EagerRank | None) -> _RankResult:
    """Prefill and decode steps, teacher-forced: with the reference's greedy tokens (VALIDATE) or the
    eager model's at this rank (LOCATE, which also compares every probe of the prefill)."""
    m = run.source.manifest
    seen: dict[int, dict[str, Tensor]] = {}  # segment -> its values, this step
    step = segmented_step(m, be, comm=comm, hook=lambda k, env: seen.__setitem__(k, dict(env)))
    bsz = run.prompt.shape[0]
    keys, values = empty_cache(m, rank, bsz, backend_capacity(run.source.backend, m, run.capacity), backend=be)
    out, tokens = _RankResult(), run.prompt
    cached = torch.zeros(bsz, dtype=torch.int64)
    lengths = torch.full((bsz,), run.prompt.shape[1], dtype=torch.int64)
    with torch.inference_mode():
        for i in range(run.steps):
            seen.clear()
            logits, keys, values = step(tokens, cached, lengths, keys, values)
            out.backend_logits.append(torch.from_numpy(host(logits)))
            if rank == 0:
                run.bar.update()
            if eager is None:
                tokens = run.forced[i].unsqueeze(1)
            else:
                elog = eager(tokens, cached, lengths)
                out.eager_logits.append(elog)
                if i == 0:  # per-probe diffs of the prefill (the longest, most informative step)
                    out.segments = _prefill_diffs(run, rank, probes, seen, eager, elog, int(lengths[0]))
                tokens = elog.argmax(-1, keepdim=True)  # teacher forcing with eager's greedy token
            cached, lengths = cached + lengths, torch.ones_like(lengths)
    return out


def _prefill_diffs(run: _Run, rank: int, probes: list[Probe], seen: dict[int, dict[str, Tensor]],
                   eager: _EagerRank, elog: Tensor, filled: int) -> list[SegmentDiff]:
    """The probes' diffs of the prefill step, and its segment files for Polygraphy (`run.dump`)."""
    diffs = _probe_diffs(rank, probes, seen, eager.captured, elog, eager.keys, eager.values, filled)
    if run.dump is not None:
        run.dump.add_rank(rank, seen, polygraphy_data.eager_references(
            run.source.manifest.rank(rank).segments, eager.recorder.inputs, elog, eager.keys, eager.values))
    return diffs


def _judge(source: ResolvedSource, results: list[_RankResult], reference: list[Tensor], *,
           t0: float) -> CompareReport:
    """Rank 0's final logits against `reference`, step by step, and every rank's probes."""
    m = source.manifest
    tolerance = TOLERANCES[m.dtype]
    cmp = Comparison(label=f"{m.variant} {source.backend.value} vs eager", tolerance=tolerance.logits_atol)
    agree = 0
    for i, (b, e) in enumerate(zip(results[0].backend_logits, reference)):
        cmp.logits.append(TensorDiff.of(f"step {i} logits", b, e, logits=True))
        agree += int(torch.equal(b.argmax(-1), e.argmax(-1)))
    cmp.tokens_agree = agree / len(reference)
    cmp.seconds = time.perf_counter() - t0
    report = CompareReport(comparison=cmp, threshold=tolerance.divergence_rel)
    for r in results:
        report.segments.extend(r.segments)
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
    """Export validation: `compare` in `Mode.VALIDATE` of the export against its checkpoint."""
    source = ModelSource(backend, checkpoint=checkpoint, artifacts=export_dir).resolve()
    return compare(source, settings, mode=Mode.VALIDATE, progress=progress).comparison


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
