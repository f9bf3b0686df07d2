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

