"""Packed q/k/v and gate/up projections: every rank packs its own slices (checked against slices cut
here from the full weights), the trainer's unpacking inverts the packing, and TP=N still equals TP=1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_export.model.checkpoint import RankWeights, build_model, checkpoint_state
from llama_export.parallel.plan import RankShape, model_parameter_names
from tests.helpers import hf_model_from_meta, random_meta_state, tiny_config, write_hf, write_meta


def _expected_wqkv(state, cfg, tp: int, rank: int) -> torch.Tensor:
    """This rank's packed wqkv, cut independently of the plan: its query heads, then its KV head(s)
    (replicated when tp > n_kv_heads: rank r uses KV head r // (tp / n_kv_heads))."""
    hd, heads = cfg.head_dim, cfg.n_heads // tp
    wq, wk, wv = (state[f"layers.0.attention.{n}.weight"] for n in ("wq", "wk", "wv"))
    q = wq[rank * heads * hd:(rank + 1) * heads * hd]
    if tp <= cfg.n_kv_heads:
        kv = cfg.n_kv_heads // tp
        ks = slice(rank * kv * hd, (rank + 1) * kv * hd)
    else:
        h = rank // (tp // cfg.n_kv_heads)
        ks = slice(h * hd, (h + 1) * hd)
    return torch.cat([q, wk[ks], wv[ks]])


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_packs_its_own_slices(tmp_path, fmt, tp):
    cfg = tiny_config("gqa")  # n_kv_heads 2: at tp=4 the KV heads are replicated
    state = random_meta_state(cfg, seed=3)
    path = write_meta(tmp_path / "m", cfg, state) if fmt == "meta" else write_hf(tmp_path / "h", hf_model_from_meta(cfg, state))
    hidden = cfg.hidden_dim // tp
    for rank in range(tp):
        with RankWeights(path, RankShape(cfg, tp, rank), dtype=torch.float32) as w:
            assert torch.equal(w.get("layers.0.attention.wqkv.weight"), _expected_wqkv(state, cfg, tp, rank))
            w13 = w.get("layers.0.feed_forward.w13.weight")
            assert torch.equal(w13[:hidden], state["layers.0.feed_forward.w1.weight"][rank * hidden:(rank + 1) * hidden])
            assert torch.equal(w13[hidden:], state["layers.0.feed_forward.w3.weight"][rank * hidden:(rank + 1) * hidden])
            assert "layers.0.attention.wq.weight" not in w.names() and "layers.1.feed_forward.w13.weight" in w.names()


def test_checkpoint_state_unpacks_what_loading_packed(tmp_path):
    cfg = dataclasses.replace(tiny_config("gqa"), vocab_size=128)
    state = random_meta_state(cfg, seed=4)
    model = build_model(write_meta(tmp_path / "m", cfg, state))
    back = checkpoint_state(model)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(back[name], t), name
    assert sorted(model_parameter_names(list(state))) == sorted(model.state_dict())
