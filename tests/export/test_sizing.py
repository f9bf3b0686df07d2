"""`plan`: per-rank sizes from the config, checked against independent arithmetic and a full-depth trace."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from llama_export.config import ModelConfig, Precision, RopeScaling
from llama_export.errors import ConfigError
from llama_export.export.exporter import rank_graph
from llama_export.export.passes.partition import partition
from llama_export.export.sizing import fmt_bytes, plan_export
from tests.helpers import run_cli

# GQA with n_kv_heads=2 (replicated at tp=4), an odd vocabulary (padded per rank), 3 layers.
CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=131, hidden_dim=176, max_seq_len=96,
                  rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32))
ESIZE = {Precision.FP32: 4, Precision.FP16: 2}


def arithmetic(cfg: ModelConfig, tp: int, esize: int) -> dict[str, int]:
    """One rank's sizes from the config and the TP rules in docs/design.md, written out independently."""
    hd, d = cfg.head_dim, cfg.dim
    heads, kv = cfg.n_heads // tp, max(1, cfg.n_kv_heads // tp)
    vocab = -(-cfg.vocab_size // tp)
    layer = (d * heads * hd) * 2 + (d * kv * hd) * 2 + 3 * d * (cfg.hidden_dim // tp) + 2 * d
    weights = esize * (cfg.vocab_size * (d // tp) + cfg.n_layers * layer + d + vocab * d)
    tables = 2 * cfg.max_seq_len * (hd // 2) * 4  # rope_cos + rope_sin, fp32
    return {
        "weights": weights,
        "tables": tables * (1 if tp == 1 else cfg.n_layers),  # one graph, or every attention segment
        "kv_per_token": 2 * cfg.n_layers * kv * hd * esize,
        # w1 and w3 are one packed w13 [2 * hidden/tp, dim], q/k/v one packed wqkv (parallel/plan.py)
        "largest": esize * max(cfg.vocab_size * (d // tp), vocab * d, 2 * d * cfg.hidden_dim // tp,
                               (heads + 2 * kv) * hd * d),
        "segments": 1 if tp == 1 else 2 * cfg.n_layers + 3,
    }


@pytest.fixture(scope="module")
def plans():
    return {(tp, d): plan_export(CFG, tp=tp, dtype=d) for tp, d in [(1, Precision.FP32), (2, Precision.FP16),
                                                                    (4, Precision.FP16), (2, Precision.FP32),
                                                                    (4, Precision.FP32)]}


@pytest.mark.parametrize("tp,dtype", [(1, Precision.FP32), (2, Precision.FP16), (4, Precision.FP16)])
def test_plan_matches_config_arithmetic(plans, tp: int, dtype: Precision) -> None:
    plan = plans[tp, dtype]
    want = arithmetic(CFG, tp, ESIZE[dtype])
    assert plan.weight_bytes == want["weights"]
    # graphs = weights + RoPE tables + the trace's few shape constants (int64 scalars and short vectors)
    assert 0 <= plan.rank_bytes - want["weights"] - want["tables"] < 256 * want["segments"]
    assert plan.kv_bytes_per_token == want["kv_per_token"]
    assert plan.kv_bytes_at_limit == want["kv_per_token"] * CFG.max_seq_len
    assert plan.largest_tensor.nbytes == want["largest"]
    assert len(plan.segments) == want["segments"]
    assert plan.export_target_bytes == 2 * 2**30 + 2 * want["largest"]


def test_two_layer_trace_extends_to_the_full_depth_trace(plans) -> None:
    """The plan traces two layers and repeats one; a trace of all three gives the same segments."""
    plan = plans[2, Precision.FP16]
    full = [c.model for c in partition(rank_graph(CFG, tp=2, dtype=Precision.FP16, max_batch=8))]
    assert len(full) == len(plan.segments)
    for seg, model in zip(plan.segments, full):
        want = sorted((name, tuple(v.const_value.shape)) for name, v in model.graph.initializers.items())
        assert sorted((t.name, tuple(t.shape)) for t in seg.tensors) == want


def test_check_fits_refuses_with_the_numbers(plans) -> None:
    plan = plans[1, Precision.FP32]
    plan.check_fits(plan.export_target_bytes)
    least = plans[4, Precision.FP32].need_bytes
    with pytest.raises(ConfigError, match=r"exporting a rank at tp=1 needs up to 2\.\d\d GiB .* --memory-limit is "
                                          r"1\.00 GiB; no valid --tp fits \(the least a rank needs is "
                                          + re.escape(fmt_bytes(least)) + r", at tp=4\); use a machine with more memory$"):
        plan.check_fits(2**30)
    # 2**24 tokens: the longest context ModelConfig admits
    long = dataclasses.replace(plans[2, Precision.FP16], cfg=dataclasses.replace(CFG, max_seq_len=2**24))
    assert long.run_bytes > long.export_target_bytes
    with pytest.raises(ConfigError, match=r"a rank at tp=2 needs 3\.\d\d GiB \(graphs .* \+ KV cache 3\.00 GiB at "
                                          r"16777216 tokens\) .* or a shorter --max-seq-len"):
        long.check_fits(5 * 2**29)


def test_the_way_out_names_only_the_degrees_that_fit(plans) -> None:
    """Between tp=2's need and tp=4's: only tp=4 is offered (each degree is planned, not assumed)."""
    need = {tp: plans[tp, Precision.FP32].need_bytes for tp in (1, 2, 4)}
    assert need[1] > need[2] > need[4]
    with pytest.raises(ConfigError, match=r"; use a --tp that fits it \(4\)$"):
        plans[1, Precision.FP32].check_fits(need[4])
    with pytest.raises(ConfigError, match=r"; use a --tp that fits it \(2, 4\)$"):
        plans[1, Precision.FP32].check_fits(need[2])


def test_plan_cli(tmp_path) -> None:
    cfg = tmp_path / "params.json"
    cfg.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 131,
                               "multiple_of": 16, "max_seq_len": 96}))
    r = run_cli("plan", "--config", str(cfg), "--tp", "2", "--memory-limit", "1GiB")
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"], r.stdout  # the table, then the refusal
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--memory-limit is 1.00 GiB" in r.stderr
    unit = run_cli("plan", "--config", str(cfg), "--memory-limit", "lots")
    assert unit.returncode == 2 and "is not a size" in unit.stderr


@pytest.mark.parametrize("text, n", [("80GiB", 80 * 2**30), ("24GB", 24 * 10**9), ("1.5 MiB", 3 * 2**19),
                                     ("512mib", 2**29), ("1000", 1000)])
def test_memory_limit_is_read_as_pydantic_reads_a_byte_size(text: str, n: int) -> None:
    from llama_export.cli import build_parser

    args = build_parser("plan").parse_args(["plan", "--config", "c.json", "--memory-limit", text])
    assert args.memory_limit == n


@pytest.mark.parametrize("n, shown", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1023.6, "1.00 KiB"),
                                      (int(2.5 * 2**30), "2.50 GiB"), (2**30 + 2**20, "1.00 GiB"),
                                      (2**30 + 6 * 2**20, "1.01 GiB"), (3 * 2**40, "3.00 TiB"), (2**50, "1024.00 TiB")])
def test_byte_counts_print_with_two_decimals_of_a_binary_unit(n: float, shown: str) -> None:
    from llama_export.export.sizing import fmt_bytes

    assert fmt_bytes(n) == shown
