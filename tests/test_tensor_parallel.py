"""TP=2 and TP=4 in real rank processes (gloo) against TP=1, through `llama-export run --json`.

Tolerance (fp32): max abs logits difference <= TOLERANCES[fp32].logits_atol (llama_export/tolerances.py),
identical greedy tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llama_export.config import Precision
from llama_export.errors import ParallelError
from llama_export.parallel.plan import RankShape, check_tp, model_parameter_names, shard_slice, valid_tp_degrees
from llama_export.model.checkpoint import RankWeights, expected_shapes
from llama_export.tolerances import TOLERANCES
from tests.helpers import random_meta_state, read_json, run_cli, tiny_config, write_meta, hf_model_from_meta, write_hf

ATOL_FP32 = TOLERANCES[Precision.FP32].logits_atol  # TP=N vs TP=1: same dtype, other summation order
STEPS = 8


def _run(ckpt, tp, out, prompt="3,14,15,92,65;35,89,79,32,38"):
    r = run_cli("run", "--checkpoint", str(ckpt), "--backend", "eager", "--tp", str(tp),
                "--prompt-ids", prompt, "--max-new-tokens", str(STEPS), "--json", str(out),
                "--logits")
    assert r.returncode == 0, r.stderr
    (batch,) = read_json(out)["batches"]  # --prompt-ids rows are one batch
    return batch


def _assert_same(a, b):
    assert a["tokens"] == b["tokens"]
    la = np.array([s["logits"] for s in a["steps"]])
    lb = np.array([s["logits"] for s in b["steps"]])
    assert la.shape == lb.shape
    err = np.abs(la - lb).max()
    assert err <= ATOL_FP32, f"max abs logits difference {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_tp_degrees_match_tp1(name, tmp_path):
    cfg = tiny_config(name)
    ckpt = write_meta(tmp_path / "ckpt", cfg, random_meta_state(cfg, seed=5))
    ref = _run(ckpt, 1, tmp_path / "tp1.json")
    assert len(ref["steps"]) == STEPS and len(ref["steps"][0]["logits"][0]) == cfg.vocab_size
    for tp in (2, 4):
        _assert_same(ref, _run(ckpt, tp, tmp_path / f"tp{tp}.json"))


@pytest.mark.slow
def test_two_shard_meta_checkpoint_at_tp4_and_hf_at_tp2(tmp_path):
    cfg = dataclasses.replace(tiny_config("gqa"), vocab_size=128)
    state = random_meta_state(cfg, seed=6)
    one = write_meta(tmp_path / "one", cfg, state, n_shards=1)
    two = write_meta(tmp_path / "two", cfg, state, n_shards=2)
    hf = write_hf(tmp_path / "hf", hf_model_from_meta(cfg, state))
    ref = _run(one, 1, tmp_path / "ref.json")
    _assert_same(ref, _run(two, 1, tmp_path / "two1.json"))
    _assert_same(ref, _run(two, 4, tmp_path / "two4.json"))
    _assert_same(ref, _run(hf, 2, tmp_path / "hf2.json"))


def test_shards_reassemble_to_the_global_tensor(tmp_path):
    """Concatenating every rank's slice (along the split dim, dropping padding) gives the original."""
    cfg = tiny_config("gqa")  # vocab 131: padded at tp=2 and 4; n_kv_heads=2: replicated at tp=4
    state = random_meta_state(cfg, seed=8)
    ckpt = write_meta(tmp_path / "c", cfg, state)
    for tp in (2, 4):
        ranks = []
        for r in range(tp):  # checkpoint names: each source's slice (the model packs them; tests/test_packed_*)
            with RankWeights(ckpt, RankShape(cfg, tp, r), dtype=torch.float32) as w:
                ranks.append({name: w.get(name) for name in state})
        for name, full in state.items():
            sl = shard_slice(name, RankShape(cfg, tp, 0))
            if sl.dim is None:
                assert all(torch.equal(rs[name], full) for rs in ranks)
                continue
            if name.endswith(("wk.weight", "wv.weight")) and tp > cfg.n_kv_heads:
                # Replicated KV heads: ranks r and r+1 hold the same head.
                per = tp // cfg.n_kv_heads
                joined = torch.cat([ranks[r][name] for r in range(0, tp, per)], dim=0)
            else:
                joined = torch.cat([rs[name] for rs in ranks], dim=sl.dim)
            joined = joined.narrow(sl.dim, 0, full.shape[sl.dim])
            assert torch.equal(joined, full), (name, tp)
        # Padding rows of the vocabulary are zero.
        last = ranks[-1]["output.weight"]
        pad = tp * last.shape[0] - cfg.vocab_size
        assert pad > 0 and torch.count_nonzero(last[-pad:]) == 0


def test_invalid_tp_names_valid_degrees():
    cfg = tiny_config("mha")
    assert valid_tp_degrees(cfg) == [1, 2, 4]
    with pytest.raises(ParallelError, match=r"n_heads=4 is not divisible by tp=3.*valid tp: 1, 2, 4"):
        check_tp(cfg, 3)
    with pytest.raises(ParallelError, match="valid tp"):
        check_tp(cfg, 0)


def test_gqa_replication_maps_query_heads_to_their_kv_head():
    cfg = dataclasses.replace(tiny_config("gqa"), n_heads=8, n_kv_heads=2, dim=128)
    for tp in (4, 8):
        for r in range(tp):
            s = RankShape(cfg, tp, r)
            first_q = r * s.local_heads
            assert s.local_kv_heads == 1
            assert s.kv_head_start == first_q // cfg.n_rep
            assert (first_q + s.local_heads - 1) // cfg.n_rep == s.kv_head_start


def test_expected_shapes_cover_every_parameter():
    from llama_export.model.transformer import Transformer

    cfg = tiny_config("mha")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert set(model.state_dict()) == set(model_parameter_names(list(expected_shapes(cfg))))
