"""Ragged batches run as one batch and equal per-prompt runs (eager and ORT, TP=1 and TP=2), whether the
prefill takes all rows in one call or each length in its own; a run that does not fit the KV cache
capacity is one clear error."""

from __future__ import annotations

import time

import pytest
import numpy as np
import torch

from llama_export.artifact.manifest import load_manifest
from llama_export.backends import open_backend
from llama_export.config import Backend, Precision
from llama_export.errors import InputError
from llama_export.export.exporter import ExportOptions, export
from llama_export.model.checkpoint import build_model
from llama_export.parallel.comm import ThreadGroup
from llama_export.engine import generate as generate_module
from llama_export.engine.batch import generate
from llama_export.engine.generate import pad_prompts, prefill_groups
from llama_export.runner.stitch import empty_cache, segmented_step
from llama_export.tolerances import TOLERANCES
from tests.helpers import random_meta_state, read_json, run_cli, tiny_config, write_meta

ROWS = [[5, 17, 3, 99, 42, 7, 8], [11, 2], [60, 61, 62, 63, 64]]  # lengths 7, 2, 5
NEW = 6
ATOL = TOLERANCES[Precision.FP32].logits_atol


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragged")
    cfg = tiny_config("gqa")
    ckpt = write_meta(root / "ckpt", cfg, random_meta_state(cfg, seed=5))
    exports = {tp: export(ExportOptions(checkpoint=ckpt, out=root / "g", tp=tp, progress=False)) for tp in (1, 2)}
    return ckpt, exports


def _eager(ckpt, tp: int, rows):
    prompt, lengths = pad_prompts(rows)

    def rank_fn(rank, comm):
        model = build_model(ckpt, tp=tp, rank=rank, comm=comm)
        cache = model.empty_cache(len(rows), int(lengths.max()) + NEW)
        return generate(model.step, prompt, cache, max_new_tokens=NEW, prompt_lengths=lengths)

    return ThreadGroup(tp).run(rank_fn)[0]


def _ort(path, rows):
    manifest = load_manifest(path)
    prompt, lengths = pad_prompts(rows)

    def rank_fn(rank, comm):
        be = open_backend(Backend.ORT, manifest, path, rank=rank, device=torch.device("cpu"))
        cache = empty_cache(manifest, rank, len(rows), int(lengths.max()) + NEW, backend=be)
        return generate(segmented_step(manifest, be, comm=comm), prompt, cache, max_new_tokens=NEW,
                        prompt_lengths=lengths)

    return ThreadGroup(manifest.tp).run(rank_fn)[0]


def test_prefill_groups():
    assert prefill_groups(np.array([7, 7, 7])) == [(0, 3)]  # equal lengths: one call
    assert prefill_groups(np.array([16, 256])) == [(0, 1), (1, 2)]  # not 2 x 256 slots
    # 8 short rows share a call; the long ones each get their own
    assert prefill_groups(np.array([10] * 7 + [12, 200, 400])) == [(0, 8), (8, 9), (9, 10)]
    assert prefill_groups(np.array([5])) == [(0, 1)]


@pytest.mark.parametrize("backend", ["eager", "ort"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("call_tokens", [10**6, 0], ids=["one-prefill-call", "a-call-per-length"])
def test_ragged_batch_equals_per_prompt_runs(setup, backend, tp, call_tokens, monkeypatch):
    ckpt, exports = setup
    monkeypatch.setattr(generate_module, "PREFILL_CALL_TOKENS", call_tokens)
    run = (lambda rows: _eager(ckpt, tp, rows)) if backend == "eager" else (lambda rows: _ort(exports[tp], rows))
    batch = run(ROWS)
    assert batch.new_tokens.shape == (len(ROWS), NEW)
    for b, row in enumerate(ROWS):
        single = run([row])
        assert batch.new_tokens[b].tolist() == single.new_tokens[0].tolist(), f"row {b}"
        for i, (sb, ss) in enumerate(zip(batch.steps, single.steps)):
            err = float(np.abs(sb.logits[b] - ss.logits[0]).max())
            assert err <= ATOL, f"row {b} step {i}: {err:.2e}"
    # The batch really is ragged and the rows really differ.
    assert len({len(r) for r in ROWS}) == 3 and len({tuple(t) for t in batch.new_tokens.tolist()}) == 3


def test_ort_ragged_equals_eager(setup):
    ckpt, exports = setup
    eager, ort = _eager(ckpt, 1, ROWS), _ort(exports[2], ROWS)
    assert np.array_equal(eager.new_tokens, ort.new_tokens)
    assert max(float(np.abs(a.logits - b.logits).max()) for a, b in zip(eager.steps, ort.steps)) <= ATOL


def test_cli_ragged_prompt_ids_on_ort_tp2(setup, tmp_path):
    """`--prompt-ids` rows of different lengths run as one batch in real rank processes."""
    _, exports = setup
    ids = ";".join(",".join(map(str, r)) for r in ROWS)
    t0 = time.monotonic()
    r = run_cli("run", "--backend", "ort", "--artifacts", str(exports[2]), "--tp", "2", "--prompt-ids", ids,
                "--max-new-tokens", str(NEW), "--json", str(tmp_path / "out.json"))
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    data = read_json(tmp_path / "out.json")
    assert 0 < data["first_token_s"] < wall, (data["first_token_s"], wall)  # from the launcher's start
    (out,) = data["batches"]  # one batch, whatever the rows' lengths
    assert out["prompt_ids"] == ROWS and out["prompts"] == [0, 1, 2]
    assert out["tokens"] == _ort(exports[1], ROWS).new_tokens.tolist()


def test_generate_refuses_a_cache_too_small(setup):
    ckpt, _ = setup
    model = build_model(ckpt)
    prompt, lengths = pad_prompts(ROWS)
    with pytest.raises(InputError, match=r"prompt \(7 tokens\) \+ max_new_tokens \(6\) = 13 exceeds the KV cache "
                                         r"capacity of 12 tokens per row"):
        generate(model.step, prompt, model.empty_cache(3, 12), max_new_tokens=NEW, prompt_lengths=lengths)


@pytest.mark.parametrize("backend", ["eager", "ort"])
def test_cli_cache_capacity_errors_are_one_line(setup, backend):
    ckpt, exports = setup
    src = ["--checkpoint", str(ckpt)] if backend == "eager" else ["--backend", "ort", "--artifacts", str(exports[1])]
    r = run_cli("run", *src, "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "4", "--cache-capacity", "6")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: prompt (3 tokens) + max_new_tokens (4) = 7 exceeds the context limit --cache-capacity 6 (the KV "
        "cache capacity per row); shorten the prompt or ask for fewer tokens"]
    r = run_cli("run", *src, "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "62")
    assert r.returncode == 2 and "exceeds the context limit max_seq_len=64" in r.stderr, r.stderr
    ok = run_cli("run", *src, "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "3", "--cache-capacity", "6")
    assert ok.returncode == 0, ok.stderr
