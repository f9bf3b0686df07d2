"""The main job through the CLI (`python export.py` runs the same code on the demo model)."""

from __future__ import annotations

import pytest

from llama_export.artifact.manifest import load_manifest
from tests.helpers import random_meta_state, run_cli, tiny_config, write_meta


@pytest.mark.slow
def test_export_job_writes_validates_and_prints_the_table(tmp_path):
    cfg = tiny_config("gqa")
    ckpt = write_meta(tmp_path / "tiny", cfg, random_meta_state(cfg, seed=3))
    r = run_cli("export", "--checkpoint", str(ckpt), "--tp", "1", "2", "--out", str(tmp_path / "g"),
                "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("tp")}
    assert set(rows) == {"tp1-fp32", "tp2-fp32"}
    assert all(line.rstrip().endswith("ok") for line in rows.values()), r.stdout
    assert load_manifest(tmp_path / "g" / "tiny" / "tp2-fp32").tp == 2



def _files(path):
    from llama_export.artifact.manifest import sha256_file

    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_variant_that_fails_validation_replaces_nothing(tmp_path, monkeypatch):
    """Validation runs on the staged export, before the swap: a failing variant goes to
    `<variant>.failed` and the earlier, validated export stays byte-identical; a later passing export
    clears the `.failed` folder."""
    import dataclasses

    from llama_export import job
    from llama_export.config import ModelDType, Precision
    from llama_export.export.exporter import ExportOptions
    from llama_export.validate.compare import VALIDATION

    cfg = tiny_config("mha")
    ckpt = write_meta(tmp_path / "tiny", cfg, random_meta_state(cfg, seed=5))
    base = ExportOptions(checkpoint=ckpt, out=tmp_path / "g", progress=False)
    settings = dataclasses.replace(VALIDATION, steps=1)
    (good,) = job.run_job(base, [1], [ModelDType(Precision.FP32)], settings=settings)
    assert good.ok and good.path == tmp_path / "g" / "tiny" / "tp1-fp32"
    before = _files(good.path)

    real = job.validate_export

    def impossible(*args, **kwargs):  # the real comparison, judged against a tolerance nothing meets
        cmp = real(*args, **kwargs)
        cmp.tolerance = -1.0
        return cmp

    monkeypatch.setattr(job, "validate_export", impossible)
    (bad,) = job.run_job(base, [1], [ModelDType(Precision.FP32)], settings=settings)
    assert not bad.ok and bad.path == job.failed_path(good.path)
    assert load_manifest(bad.path).variant == "tp1-fp32"  # kept whole, for `llama-export compare`
    assert _files(good.path) == before
    assert sorted(p.name for p in good.path.parent.iterdir()) == ["tp1-fp32", "tp1-fp32.failed"]

    monkeypatch.undo()
    (again,) = job.run_job(base, [1], [ModelDType(Precision.FP32)], settings=settings)
    assert again.ok and sorted(p.name for p in good.path.parent.iterdir()) == ["tp1-fp32"]


def test_each_variant_is_checked_once_and_the_result_handed_down(tmp_path, monkeypatch):
    """`run_job` checks every variant up front and hands the result to its export: the checkpoint's
    config is loaded once per variant and the quantized names (one meta model per rank) are found
    once per variant, not again when it is exported."""
    from llama_export import job
    from llama_export.config import ModelConfig, ModelDType, Precision, WeightQuant
    from llama_export.export import exporter
    from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

    # hidden 192 (multiple_of 32): every weight's input features split into blocks of 16 at tp=2
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=131, hidden_dim=192, max_seq_len=64)
    ckpt = tmp_path / "tiny"
    save_meta_checkpoint(ckpt, random_meta_state(cfg, seed=3), to_meta_params(cfg, multiple_of=32))
    calls = {"load_config": 0, "quantized_parameters": 0}

    def spy(name):
        real = getattr(exporter, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(exporter, name, counted)

    spy("load_config")
    spy("quantized_parameters")
    base = exporter.ExportOptions(checkpoint=ckpt, out=tmp_path / "g", progress=False)
    reports = job.run_job(base, [1, 2], [ModelDType(Precision.FP32, WeightQuant(8, 16))], validate=False)
    assert [r.variant for r in reports] == ["tp1-int8b16-fp32", "tp2-int8b16-fp32"]
    assert calls == {"load_config": 2, "quantized_parameters": 1 + 2}  # per variant: once; per rank: once
    m = load_manifest(tmp_path / "g" / "tiny" / "tp2-int8b16-fp32")
    assert m.quantized_weights and "layers.0.feed_forward.w2.weight" in m.quantized_weights
