"""Export → ONNX Runtime (CPU) against eager: TP=1, 2, 4; MHA and GQA; prefill + 8 greedy decode steps.

Tolerances on fp32 logits (max abs): TOLERANCES[dtype].logits_atol (llama_export/tolerances.py) against
eager in the same dtype (fp16: observed ~7e-3), with identical greedy tokens in both cases.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import dataclasses

from llama_export.artifact import schema
from llama_export.artifact.manifest import load_manifest, resolve_inside, sha256_file
from llama_export.config import ModelDType, Precision
from llama_export.export.exporter import ExportOptions, export
from llama_export.export.passes.check import DECOMPOSITION_OPS
from llama_export.validate.compare import VALIDATION, validate_export
from llama_export.tolerances import TOLERANCES
from tests.helpers import random_meta_state, read_json, run_cli, tiny_config, write_meta


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in ("mha", "gqa"):
        cfg = tiny_config(name)
        out[name] = write_meta(root / name, cfg, random_meta_state(cfg, seed=11))
    return root, out


@pytest.fixture(scope="module")
def exports(ckpts):
    """(config name, tp, dtype) -> export dir, built lazily and shared by the tests."""
    root, paths = ckpts
    cache = {}

    def get(name: str, tp: int, dtype: Precision = Precision.FP32):
        key = (name, tp, dtype)
        if key not in cache:
            cache[key] = export(ExportOptions(checkpoint=paths[name], out=root / "graphs", tp=tp, dtype=dtype,
                                              progress=False))
        return cache[key]

    return get


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ort_matches_eager_fp32(name, tp, exports, ckpts):
    cmp = validate_export(exports(name, tp), ckpts[1][name])
    assert len(cmp.logits) == 9  # the prefill and 8 decode steps
    assert cmp.max_abs <= TOLERANCES[Precision.FP32].logits_atol == 1e-4, str(cmp)
    assert cmp.tokens_agree == 1.0 and cmp.min_cosine > 0.99999, str(cmp)
    assert cmp


@pytest.mark.parametrize("tp", [1, 2])
def test_ort_matches_eager_fp16(tp, exports, ckpts):
    cmp = validate_export(exports("gqa", tp, Precision.FP16), ckpts[1]["gqa"])
    assert cmp.max_abs <= TOLERANCES[Precision.FP16].logits_atol, str(cmp)
    assert cmp.tokens_agree == 1.0, str(cmp)


def test_graphs_hold_custom_nodes_and_pass_the_checker(exports):
    path = exports("gqa", 2)
    m = load_manifest(path)
    cfg = m.model
    totals = Counter()
    for r in m.ranks:
        kinds = [s.kind for s in r.segments]
        assert kinds == ["embed"] + ["attention", "ffn"] * cfg.n_layers + ["head", "tail"]
        for seg in r.segments:
            f = resolve_inside(path, seg.file)
            assert sha256_file(f) == seg.sha256
            model = onnx.load(str(f))
            schema.check_model(model)
            assert model.ir_version == 10
            ops = Counter((n.domain, n.op_type) for n in model.graph.node)
            assert not {op for _, op in ops} & DECOMPOSITION_OPS
            assert not any(n.domain == schema.DOMAIN and n.op_type in schema.COLLECTIVE_OPS
                           for n in model.graph.node), "collective markers must be cut out"
            if r.rank == 0:
                for (dom, op), c in ops.items():
                    if dom == schema.DOMAIN:
                        totals[op] += c
            names = [n.name for n in model.graph.node]
            assert len(names) == len(set(names)) and all(n.startswith("/model") for n in names)
            # Collectives follow exactly the attention / ffn / embed / head segments.
            want = {"embed": "AllGather", "attention": "AllReduce", "ffn": "AllReduce", "head": "AllGather"}
            assert (seg.collective.op if seg.collective else None) == want.get(seg.kind)
    assert totals == {"RMSNorm": 2 * cfg.n_layers + 1, "RoPE": 2 * cfg.n_layers, "Attention": cfg.n_layers}


def test_manifest_describes_kv_cache_io(exports):
    m = load_manifest(exports("gqa", 4))
    cfg = m.model
    assert m.tp == 4 and m.opset == 23 and m.custom_nodes["domain"] == "llama_export"
    specs = {s.name: s for r in m.ranks[:1] for seg in r.segments for s in (*seg.inputs, *seg.outputs)}
    # GQA with n_kv_heads=2 < tp=4: one (replicated) KV head per rank.
    assert specs["past_key_0"].shape == ("batch", 1, "capacity", cfg.head_dim)
    assert specs["present_key_0"].shape == specs["past_key_0"].shape  # the same buffer, written in place
    assert specs["cache_lengths"].shape == specs["token_lengths"].shape == ("batch",)
    assert specs["cache_lengths"].dtype == specs["token_lengths"].dtype == "int64"
    assert specs["logits"].shape == ("batch", cfg.vocab_size) and specs["logits"].dtype == "float32"
    assert specs["tokens"].dtype == "int64"


@pytest.mark.slow
def test_run_cli_ort_tp2_equals_eager(exports, ckpts, tmp_path):
    """Real rank processes stitched with gloo collectives, through `llama-export run --backend ort`."""
    prompt = "3,14,15,92,65;35,89,79,32,38"
    eager = run_cli("run", "--checkpoint", str(ckpts[1]["gqa"]), "--prompt-ids", prompt, "--max-new-tokens", "8",
                    "--json", str(tmp_path / "e.json"), "--logits")
    assert eager.returncode == 0, eager.stderr
    ort = run_cli("run", "--artifacts", str(exports("gqa", 2)), "--backend", "ort", "--tp", "2",
                  "--prompt-ids", prompt, "--max-new-tokens", "8", "--json", str(tmp_path / "o.json"),
                  "--logits")
    assert ort.returncode == 0, ort.stderr
    (e,), (o,) = read_json(tmp_path / "e.json")["batches"], read_json(tmp_path / "o.json")["batches"]
    assert o["tokens"] == e["tokens"]
    err = np.abs(np.array([s["logits"] for s in o["steps"]]) - np.array([s["logits"] for s in e["steps"]])).max()
    assert err <= TOLERANCES[Precision.FP32].logits_atol
    wrong_tp = run_cli("run", "--artifacts", str(exports("gqa", 2)), "--backend", "ort", "--tp", "4",
                       "--prompt-ids", prompt, "--max-new-tokens", "2")
    assert wrong_tp.returncode == 2 and "is for tp=2, not --tp 4; use --tp 2" in wrong_tp.stderr


def test_bf16_export_is_checked_but_not_run_on_ort_cpu(ckpts, tmp_path):
    from llama_export.job import run_job

    base = ExportOptions(checkpoint=ckpts[1]["gqa"], out=tmp_path, progress=False)
    (report,) = run_job(base, [2], [ModelDType(Precision.BF16)])
    assert report.comparison is None and "no bf16 kernels" in report.note
    m = load_manifest(report.path)
    assert m.dtype is Precision.BF16
    seg = m.rank(0).segments[1]
    model = onnx.load(str(resolve_inside(report.path, seg.file)))
    schema.check_model(model)
    types = {i.data_type for i in model.graph.initializer if i.name.endswith("weight_t")}
    assert types == {onnx.TensorProto.BFLOAT16}
    specs = {s.name: s for s in (*seg.inputs, *seg.outputs)}
    assert specs["past_key_0"].dtype == "bfloat16" and specs["present_key_0"].dtype == "bfloat16"


def test_hf_checkpoint_exports_and_validates(tmp_path):
    from tests.helpers import hf_model_from_meta, write_hf

    cfg = tiny_config("gqa")
    hf_dir = write_hf(tmp_path / "hf", hf_model_from_meta(cfg, random_meta_state(cfg, seed=12)))
    path = export(ExportOptions(checkpoint=hf_dir, out=tmp_path / "g", tp=2, progress=False))
    cmp = validate_export(path, hf_dir, settings=dataclasses.replace(VALIDATION, steps=4))
    assert cmp and cmp.max_abs <= TOLERANCES[Precision.FP32].logits_atol, str(cmp)
