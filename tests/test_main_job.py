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
