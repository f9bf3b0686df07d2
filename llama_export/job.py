"""The main job: export one or more variants of a checkpoint, validate each on ONNX Runtime, report.

It sits above both the exporter and the comparison engine (`validate.compare`, validation mode), and owns
the order that keeps earlier results safe: check everything, export into a staging folder, write its
ONNX Runtime lowering (`backends.ort.prelower`), validate the staged export, and only then swap it into
place (`files.staging`).

    graphs/demo/tp2-fp32/          the last export that passed validation (untouched by a failure)
    graphs/demo/tp2-fp32.failed/   the last one that did not, kept for `llama-export compare`
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from llama_export.artifact.manifest import failed_path, load_manifest, resolve_inside
from llama_export.artifact.schema import COMPUTE_OPS
from llama_export.backends.ort.prelower import write_lowered
from llama_export.config import ModelDType, Precision
from llama_export.export.exporter import ExportOptions, check_export, export_into
from llama_export.export.passes.check import custom_node_counts
from llama_export.files import staging
from llama_export.validate.compare import VALIDATION, CompareSettings, check_settings, validate_export
from llama_export.validate.diff import Comparison

log = logging.getLogger(__name__)


@dataclass
class VariantReport:
    variant: str
    path: Path
    segments: int
    nodes: int
    custom_nodes: int
    export_s: float
    comparison: Comparison | None  # None: not validated (bf16 on CPU, or --no-validate)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.comparison is None or bool(self.comparison)


def _graph_stats(path: Path) -> tuple[int, int, int]:
    m = load_manifest(path, verify_hashes=False)
    nodes = custom = 0
    for seg in m.rank(0).segments:
        graph = ir.load(str(resolve_inside(path, seg.file))).graph
        nodes += len(graph)
        counts = custom_node_counts(graph)
        custom += sum(counts[o] for o in COMPUTE_OPS)
    return len(m.rank(0).segments), nodes, custom


def run_job(base: ExportOptions, tps: list[int], dtypes: list[ModelDType], *, validate: bool = True,
            settings: CompareSettings = VALIDATION) -> list[VariantReport]:
    """Export and validate each variant. Every variant is checked (config, TP degree, target folder,
    validation length) before the first starts. A variant is written to a staging folder and validated
    there; only one that passed replaces an earlier export. One that failed goes to
    `failed_path(target)` and the earlier export stays."""
    variants = [dataclasses.replace(base, tp=tp, dtype=dtype.activations, weights=dtype.weights)
                for dtype in dtypes for tp in tps]
    checked = [check_export(opts) for opts in variants]
    if validate:
        for c in checked:
            check_settings(settings, c.cfg)
    reports = []
    for c in checked:
        opts = c.opts
        with staging(opts.target) as stage:
            t0 = time.perf_counter()
            write_lowered(stage.path, export_into(c, stage.path))  # the ORT lowering, ready to run
            dt = time.perf_counter() - t0
            segs, nodes, custom = _graph_stats(stage.path)
            cmp, note = None, ""
            if not validate:
                note = "not validated (--no-validate)"
            elif opts.dtype is Precision.BF16:
                note = "not run: ONNX Runtime CPU has no bf16 kernels (checked with onnx.checker only)"
            else:
                cmp = validate_export(stage.path, base.checkpoint, settings=settings, progress=base.progress)
                if not cmp:
                    stage.divert(failed_path(opts.target))
            if cmp is None or cmp:
                shutil.rmtree(failed_path(opts.target), ignore_errors=True)  # an older failure is history now
        reports.append(VariantReport(opts.variant, stage.target, segs, nodes, custom, dt, cmp, note))
    return reports


def format_table(reports: list[VariantReport]) -> str:
    head = (f"{'variant':<14} {'segs/rank':>9} {'nodes':>6} {'custom':>6} {'max abs':>9} {'cosine':>10} "
            f"{'top-1':>6} {'greedy':>6} {'export s':>8} {'check s':>7}  result")
    lines = [head, "-" * len(head)]
    for r in reports:
        c = r.comparison
        if c is None:
            lines.append(f"{r.variant:<14} {r.segments:>9} {r.nodes:>6} {r.custom_nodes:>6} {'-':>9} {'-':>10} "
                         f"{'-':>6} {'-':>6} {r.export_s:>8.1f} {'-':>7}  {r.note}")
        else:
            verdict = "ok" if c else f"FAIL (tolerance {c.tolerance:.0e})"
            lines.append(f"{r.variant:<14} {r.segments:>9} {r.nodes:>6} {r.custom_nodes:>6} {c.max_abs:>9.2e} "
                         f"{c.min_cosine:>10.6f} {c.top1:>6.3f} {c.tokens_agree:>6.3f} {r.export_s:>8.1f} "
                         f"{c.seconds:>7.1f}  {verdict}")
    return "\n".join(lines)
