"""scripts/train_demo.py is deterministic given its seed (two short runs agree bit for bit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_demo.py"
# Small enough to finish in seconds; the corpus cap still yields a full 1536-piece tokenizer.
SMOKE = ["--steps", "3", "--max-corpus-bytes", "300000", "--batch-size", "4", "--sample-tokens", "4"]


def _train(out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(SCRIPT), *SMOKE, *extra, "--out", str(out)],
        check=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)


def test_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], env=env, capture_output=True, text=True, check=True)
    assert "--max-corpus-bytes" in res.stdout and "--seed" in res.stdout


@pytest.mark.slow
def test_same_seed_same_model_other_seed_other_model(tmp_path: Path) -> None:
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    _train(tmp_path / "c", "--seed", "1")
    a, b, c = (_weights(tmp_path / d) for d in "abc")

    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert (tmp_path / "a" / "params.json").read_text() == (tmp_path / "b" / "params.json").read_text()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.float16, name
        assert torch.equal(a[name], b[name]), f"{name} differs between two runs with the same seed"
    # Guard against a check that passes trivially: the seed does reach the weights.
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
