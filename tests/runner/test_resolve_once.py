"""A run resolves its model source once and hands it down.

At TP=1 (the library's `commands.run.run`, the parent process is rank 0): manifest.json is parsed once,
the config loaded once, the export's text files hashed once and the tokenizer loaded once. At TP=2 (real
rank processes over gloo): the launcher plans the run (tokenizes and validates the prompt) once and hands
the plan to its ranks in the run folder; the ranks read it instead of planning again, only rank 0 loads
the tokenizer (to print text), and the output equals TP=1's. Under torchrun (no launcher) each rank plans
for itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llama_export.artifact import manifest as manifest_module
from llama_export.commands import run as run_module
from llama_export.config import Backend, ModelConfig
from llama_export.demo import DEMO_DIR
from llama_export.export.exporter import ExportOptions, export
from llama_export.model import checkpoint
from llama_export.runner.source import ModelSource
from llama_export.text import TEXT_FILES, formats
from tests.helpers import REPO, random_meta_state, read_json, run_cli, write_meta

ATOL_FP32 = 1e-4  # TP=2 vs TP=1 logits (fp32)


class _Collect:
    def __init__(self) -> None:
        self.summary = None

    def text(self, delta: str) -> None:
        pass

    def finish(self, opts, summary) -> None:
        self.summary = summary


def _spy(monkeypatch, calls: Counter, obj, name: str, *, key=None) -> None:
    """Count calls of `obj.name` (under `key(args)` when given, else under `name`)."""
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls[key(args) if key else name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)


def _spy_reads(monkeypatch) -> Counter:
    """Spies on everything a run reads: manifest parses, config loads, text-file hashes, tokenizer loads
    (`detect_format` runs once in every `load_tokenizer`, whoever imported it)."""
    calls: Counter = Counter()
    real_from_json = manifest_module.Manifest.from_json.__func__

    def from_json(cls, *args, **kwargs):
        calls["manifest parsed"] += 1
        return real_from_json(cls, *args, **kwargs)

    monkeypatch.setattr(manifest_module.Manifest, "from_json", classmethod(from_json))
    _spy(monkeypatch, calls, checkpoint, "load_config")
    _spy(monkeypatch, calls, formats, "detect_format")
    _spy(monkeypatch, calls, manifest_module, "sha256_file",
         key=lambda args: "text file hashed" if Path(args[0]).name in TEXT_FILES else "other file hashed")
    return calls


def _run(source: ModelSource, reporter) -> int:
    opts = run_module.RunOptions(source=source, tp=1, prompts=("def ",), max_new_tokens=3, stream=False,
                                 progress=False)
    return run_module.run(opts, [], reporter)


def test_tp1_run_on_the_demo_model_loads_config_and_tokenizer_once(monkeypatch):
    calls = _spy_reads(monkeypatch)
    out = _Collect()
    assert _run(ModelSource(Backend.EAGER), out) == 0
    assert out.summary is not None and out.summary.new_tokens == 3 and out.summary.texts[0]
    assert calls == {"load_config": 1, "detect_format": 1}


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory) -> Path:
    """A tiny TP=1 export that carries the demo model's tokenizer (its vocabulary size)."""
    root = tmp_path_factory.mktemp("resolve")
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1536, hidden_dim=176, max_seq_len=64)
    ckpt = write_meta(root / "tiny", cfg, random_meta_state(cfg, seed=7))
    shutil.copyfile(DEMO_DIR / "tokenizer.model", ckpt / "tokenizer.model")
    return export(ExportOptions(checkpoint=ckpt, out=root / "g", tp=1, progress=False))


def test_tp1_run_on_an_export_parses_the_manifest_once(ort_export, monkeypatch):
    calls = _spy_reads(monkeypatch)
    out = _Collect()
    assert _run(ModelSource(Backend.ORT, artifacts=ort_export, rehash=True), out) == 0
    assert out.summary is not None and out.summary.new_tokens == 3
    # rehash: the rank's graph and data file are hashed however fresh their records are (once each)
    assert calls == {"manifest parsed": 1, "detect_format": 1, "text file hashed": 1, "other file hashed": 2}


# ---- TP=2: the launcher plans once, its ranks read the plan --------------------------------------

# Loaded at start-up by every process of a run through PYTHONPATH: logs what each process calls to
# <SPY_LOG>/<RANK or "launcher">.log, one name a line.
SITECUSTOMIZE = '''
import os
from pathlib import Path

from llama_export.commands import run
from llama_export.runner import env
from llama_export.text import formats

_who = os.environ.get("RANK", "launcher")


def _spy(module, name, describe=None):
    real = getattr(module, name)

    def logged(*args, **kwargs):
        result = real(*args, **kwargs)
        with open(Path(os.environ["SPY_LOG"]) / f"{_who}.log", "a") as f:
            f.write((describe(result) if describe else name) + "\\n")
        return result

    setattr(module, name, logged)


_spy(formats, "detect_format")  # a tokenizer load
_spy(run, "plan_run")  # tokenize and validate the prompts
_spy(env, "read_handoff", lambda plan: "read_handoff: " + ("a plan" if plan is not None else "none"))
'''


def _logs(folder: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines() for p in sorted(folder.glob("*.log"))}


def _spied_env(tmp_path: Path) -> dict[str, str]:
    spy = tmp_path / "spy"
    (spy / "log").mkdir(parents=True)
    (spy / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": f"{spy}{os.pathsep}{REPO}", "SPY_LOG": str(spy / "log")}


def _args(out: Path, tp: int) -> list[str]:
    return ["run", "--backend", "eager", "--tp", str(tp), "--prompt", "def parse(", "--max-new-tokens", "4",
            "--json", str(out), "--logits", "--no-progress"]


def _assert_same(a: dict, b: dict) -> None:
    (a,), (b,) = a["batches"], b["batches"]
    assert a["prompt_ids"] == b["prompt_ids"] and a["tokens"] == b["tokens"]
    err = np.abs(np.array([s["logits"] for s in a["steps"]]) - np.array([s["logits"] for s in b["steps"]])).max()
    assert err <= ATOL_FP32, f"max abs logits difference {err:.2e}"


@pytest.mark.slow
def test_tp2_ranks_read_the_launchers_plan_and_match_tp1(tmp_path):
    env = _spied_env(tmp_path)
    r = run_cli(*_args(tmp_path / "tp2.json", 2), env=env)
    assert r.returncode == 0, r.stderr
    logs = _logs(Path(env["SPY_LOG"]))
    assert logs == {
        "launcher": ["detect_format", "plan_run"],  # tokenizer loaded and prompt validated once
        "0": ["read_handoff: a plan", "detect_format"],  # rank 0 loads the tokenizer only to print text
        "1": ["read_handoff: a plan"],  # no tokenizer, no validation
    }, logs
    ref = run_cli(*_args(tmp_path / "tp1.json", 1))
    assert ref.returncode == 0, ref.stderr
    _assert_same(read_json(tmp_path / "tp1.json"), read_json(tmp_path / "tp2.json"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_torchrun_each_rank_plans_for_itself(tmp_path):
    """No launcher (torchrun's environment, no run folder): each rank tokenizes and validates itself."""
    env = {**os.environ, **_spied_env(tmp_path), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "llama_export.cli", *_args(tmp_path / "tr.json", 2)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    logs = _logs(Path(env["SPY_LOG"]))
    assert logs == {str(r): ["read_handoff: none", "detect_format", "plan_run"] for r in range(2)}, logs
    ref = run_cli(*_args(tmp_path / "tp1.json", 1))
    assert ref.returncode == 0, ref.stderr
    _assert_same(read_json(tmp_path / "tp1.json"), read_json(tmp_path / "tr.json"))
