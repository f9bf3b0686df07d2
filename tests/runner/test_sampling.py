"""Sampling with temperature and top-p, and the claim that every rank picks the same token.

The runner never broadcasts the sampled token: every rank samples from the same all-gathered logits
with a generator seeded alike, so the ranks must agree by construction. These tests check both halves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_export.errors import NonFiniteError
from llama_export.model.checkpoint import build_model
from llama_export.parallel.comm import ThreadGroup
from llama_export.engine.batch import generate
from llama_export.engine.generate import SamplingConfig, sample
from tests.helpers import random_meta_state, run_cli, read_json, tiny_config, write_meta


def _draws(logits, cfg: SamplingConfig, n: int = 4000) -> torch.Tensor:
    rng = np.random.default_rng(cfg.seed)
    return torch.from_numpy(np.stack([sample(np.asarray(logits), cfg, rng) for _ in range(n)]).flatten())


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    assert sample(logits.numpy(), SamplingConfig(), np.random.default_rng()).tolist() == [1]


def test_top_p_keeps_only_the_nucleus():
    # softmax of these logits: ~[0.61, 0.22, 0.08, 0.03, 0.03, 0.03]; top_p 0.8 keeps tokens 0 and 1
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0, 0.0]])
    draws = _draws(logits, SamplingConfig(temperature=1.0, top_p=0.8, seed=3))
    assert set(draws.tolist()) == {0, 1}
    frac0 = (draws == 0).float().mean().item()
    want = 0.61 / (0.61 + 0.22)  # renormalised within the nucleus
    assert abs(frac0 - want) < 0.03, frac0


def test_top_p_1_samples_the_whole_distribution_at_its_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = _draws(logits, SamplingConfig(temperature=1.0, top_p=1.0, seed=4))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03), freq


def test_temperature_sharpens_and_flattens():
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    cold = (_draws(logits, SamplingConfig(temperature=0.25, seed=5)) == 0).float().mean().item()
    hot = (_draws(logits, SamplingConfig(temperature=4.0, seed=5)) == 0).float().mean().item()
    # p0 ∝ 0.6^(1/T): T=0.25 → 0.6^4/(0.6^4+0.4^4) ≈ 0.835; T=4 → ≈ 0.525
    assert abs(cold - 0.835) < 0.03 and abs(hot - 0.525) < 0.03, (cold, hot)


def test_same_seed_same_draws():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0.9, top_p=0.9, seed=11)
    assert torch.equal(_draws(logits, cfg, 50), _draws(logits, cfg, 50))


def test_every_rank_samples_the_same_tokens_as_tp1(tmp_path):
    cfg = tiny_config("gqa")
    ckpt = write_meta(tmp_path / "ckpt", cfg, random_meta_state(cfg, seed=9))
    prompt = torch.tensor([[3, 14, 15, 92], [65, 35, 89, 79]])
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, seed=1)

    def rank_fn(rank, comm):
        model = build_model(ckpt, tp=comm.world_size, rank=rank, comm=comm)
        return generate(model.step, prompt, model.empty_cache(2, prompt.shape[1] + 12), max_new_tokens=12,
                        sampling=sampling).new_tokens

    per_rank = ThreadGroup(4).run(rank_fn)
    tp1 = ThreadGroup(1).run(rank_fn)[0]
    assert all(np.array_equal(t, per_rank[0]) for t in per_rank[1:])
    assert np.array_equal(per_rank[0], tp1)
    model = build_model(ckpt)
    greedy = generate(model.step, prompt, model.empty_cache(2, prompt.shape[1] + 12), max_new_tokens=12).new_tokens
    assert not np.array_equal(tp1, greedy)  # sampling really sampled


def test_cli_sampling_at_tp2_equals_tp1(tmp_path):
    cfg = tiny_config("mha")
    ckpt = write_meta(tmp_path / "ckpt", cfg, random_meta_state(cfg, seed=10))
    outs = []
    for tp in (1, 2):
        r = run_cli("run", "--checkpoint", str(ckpt), "--tp", str(tp), "--prompt-ids", "1,2,3", "--max-new-tokens",
                    "10", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--json", str(tmp_path / f"{tp}.json"))
        assert r.returncode == 0, r.stderr
        outs.append(read_json(tmp_path / f"{tp}.json")["batches"][0]["tokens"])
    assert outs[0] == outs[1]


def _step_with_inf_at(decode_step: int, row: int):
    """A step function over a 3-token vocabulary whose logits are finite except `row`'s at one decode step."""
    calls = []

    def step(tokens, cached, lengths, keys, values):
        logits = np.tile(np.array([0.0, 1.0, 0.5], dtype=np.float32), (len(tokens), 1))
        if len(calls) == decode_step:
            logits[row, 2] = np.inf
        calls.append(1)
        return logits, keys, values
    return step


def test_non_finite_logits_end_generation_naming_the_step_and_row():
    cache = ([np.zeros((2, 1, 8, 1), dtype=np.float32)], [np.zeros((2, 1, 8, 1), dtype=np.float32)])
    prompt = np.array([[1, 2], [2, 1]])
    ok = generate(_step_with_inf_at(99, 0), prompt, cache, max_new_tokens=4)
    assert ok.new_tokens.tolist() == [[1] * 4, [1] * 4]
    with pytest.raises(NonFiniteError, match=r"in decode step 2 of request 1: .*run in fp32"):
        generate(_step_with_inf_at(2, 1), prompt, cache, max_new_tokens=4)
    with pytest.raises(NonFiniteError, match=r"in the prefill of request 0"):
        generate(_step_with_inf_at(0, 0), prompt, cache, max_new_tokens=4)
