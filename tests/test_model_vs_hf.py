"""The eager model against Hugging Face transformers' LlamaForCausalLM on the same random weights.

Tolerance (fp32): max abs error on logits <= TOLERANCES[fp32].logits_atol (llama_export/tolerances.py;
logits are O(1) here; observed ~1e-6).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_export.config import Precision
from llama_export.model.checkpoint import build_model, load_config
from llama_export.engine.generate import pad_prompts
from llama_export.tolerances import TOLERANCES
from tests.helpers import hf_model_from_meta, lengths, random_meta_state, tiny_config, write_hf, write_meta

ATOL_FP32 = TOLERANCES[Precision.FP32].logits_atol  # eager vs transformers: same dtype, other kernels
DECODE_STEPS = 8


@pytest.fixture(scope="module", params=["mha", "gqa"])
def setup(request, tmp_path_factory):
    cfg = tiny_config(request.param)
    state = random_meta_state(cfg, seed=1)
    hf = hf_model_from_meta(cfg, state)
    root = tmp_path_factory.mktemp(request.param)
    meta_dir = write_meta(root / "meta", cfg, state)
    hf_dir = write_hf(root / "hf", hf)
    return cfg, hf, meta_dir, hf_dir


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_config_round_trip(setup, fmt):
    cfg, _, meta_dir, hf_dir = setup
    assert load_config(meta_dir if fmt == "meta" else hf_dir) == cfg


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_prefill_and_decode_match_transformers(setup, fmt):
    cfg, hf, meta_dir, hf_dir = setup
    model = build_model(meta_dir if fmt == "meta" else hf_dir)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=g)
    keys, values = model.empty_cache(2, 5 + DECODE_STEPS)
    seq = prompt
    tokens = prompt
    with torch.no_grad():
        for step in range(DECODE_STEPS + 1):
            logits, keys, values = model(tokens, lengths(2, seq.shape[1] - tokens.shape[1]),
                                         lengths(2, tokens.shape[1]), keys, values)
            # Full recomputation by the reference: no cache involved on its side.
            ref = hf(seq).logits[:, -1].float()
            assert logits.shape == (2, cfg.vocab_size)
            err = (logits - ref).abs().max().item()
            assert err <= ATOL_FP32, f"{fmt} step {step}: max abs error {err:.2e}"
            # Argmax must agree too; and the logits must not be degenerate.
            assert torch.equal(logits.argmax(-1), ref.argmax(-1))
            assert ref.std() > 0.1
            tokens = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, tokens], dim=1)
    assert keys[0].shape == (2, cfg.n_kv_heads, 5 + DECODE_STEPS, cfg.head_dim)  # preallocated, written in place


def test_kv_cache_equals_full_recomputation(setup):
    cfg, _, meta_dir, _ = setup
    model = build_model(meta_dir)
    seq = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _, _ = model(seq, lengths(1, 0), lengths(1, 12), *model.empty_cache(1))
        _, k, v = model(seq[:, :7], lengths(1, 0), lengths(1, 7), *model.empty_cache(1))
        for t in range(7, 12):
            inc, k, v = model(seq[:, t : t + 1], lengths(1, t), lengths(1, 1), k, v)
    assert (inc - full).abs().max().item() <= 1e-5


def test_ragged_batch_matches_transformers_per_row(setup):
    """Right-padded rows of different lengths in one batch, prefill + decode, each row against
    transformers run on that row alone (no padding on the reference side)."""
    cfg, hf, meta_dir, _ = setup
    model = build_model(meta_dir)
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 2, 5)]
    tokens, lens = (torch.from_numpy(a) for a in pad_prompts(rows))
    keys, values = model.empty_cache(3, 7 + DECODE_STEPS)
    seqs = [list(r) for r in rows]
    cached = torch.zeros(3, dtype=torch.int64)
    with torch.no_grad():
        for step in range(DECODE_STEPS):
            logits, keys, values = model(tokens, cached, lens, keys, values)
            for b, seq in enumerate(seqs):
                ref = hf(torch.tensor([seq])).logits[0, -1].float()
                err = (logits[b] - ref).abs().max().item()
                assert err <= ATOL_FP32, f"row {b} step {step}: max abs error {err:.2e}"
            nxt = logits.argmax(-1)
            for b, seq in enumerate(seqs):
                seq.append(int(nxt[b]))
            cached, lens, tokens = cached + lens, torch.ones_like(lens), nxt[:, None]


def test_two_source_shards_load(tmp_path):
    # Meta's own shards split the vocabulary evenly, so give it an even one.
    cfg = dataclasses.replace(tiny_config("gqa"), vocab_size=128)
    state = random_meta_state(cfg, seed=2)
    one = build_model(write_meta(tmp_path / "one", cfg, state, n_shards=1))
    two = build_model(write_meta(tmp_path / "two", cfg, state, n_shards=2))
    for (n, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_safetensors_with_index(tmp_path):
    cfg = tiny_config("gqa")
    state = random_meta_state(cfg, seed=4)
    hf = hf_model_from_meta(cfg, state)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    model = build_model(tmp_path / "hf")
    prompt = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _, _ = model(prompt, lengths(1, 0), lengths(1, 6), *model.empty_cache(1))
        ref = hf(prompt).logits[:, -1].float()
    assert (got - ref).abs().max().item() <= ATOL_FP32


def test_tied_embeddings_hf_checkpoint(tmp_path):
    """Llama 3.2-style checkpoints tie lm_head to the embedding and store no lm_head.weight."""
    import transformers

    cfg = tiny_config("gqa")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=2,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=64,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
    hf.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = build_model(tmp_path / "hf")
    assert model.cfg.tie_word_embeddings
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, _, _ = model(prompt, lengths(2, 0), lengths(2, 5), *model.empty_cache(2))
        ref = hf(prompt).logits[:, -1].float()
    assert ref.std() > 0.1
    assert (got - ref).abs().max().item() <= ATOL_FP32
