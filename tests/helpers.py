"""Tiny models with fixed seeds, written as real Meta and Hugging Face checkpoints.

Weights are drawn in Meta's layout; the HF copy is made with the permutation from Hugging Face's own
conversion script (`convert_llama_weights_to_hf.py`, `permute`), written out here independently of the
package so that a wrong permutation in the loader cannot hide behind a shared helper.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llama_export.config import ModelConfig, RopeScaling
from llama_export.model.checkpoint import expected_shapes
from llama_export.model.meta_format import save_meta_checkpoint, to_meta_params

REPO = Path(__file__).resolve().parents[1]

# name -> (ModelConfig kwargs, multiple_of) ; hidden_dim = meta_ffn_hidden_dim(dim, multiple_of, None)
CONFIGS: dict[str, dict] = {
    # MHA, odd vocabulary
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=101, hidden_dim=176, max_seq_len=64),
    # GQA with n_kv_heads < 4 (replicated at tp=4), Llama-3.1 RoPE scaling, rope_theta 500000
    "gqa": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=131, hidden_dim=176, max_seq_len=64,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16),
    ),
}
MULTIPLE_OF = 16  # meta_ffn_hidden_dim(64, 16, None) == 176


def tiny_config(name: str) -> ModelConfig:
    return ModelConfig(**CONFIGS[name])


def random_meta_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights large enough that logits differ meaningfully between tokens."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1]
            state[name] = torch.randn(shape, generator=g) * (1.0 / fan_in**0.5)
    return state


def packed_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TP=1 model's state dict from Meta-named weights: packed projections are their sources stacked
    along dim 0 (parallel.plan.PACKED)."""
    from llama_export.parallel.plan import model_parameter_names, packed_sources

    return {name: torch.cat([state[s] for s in packed_sources(name)]) if packed_sources(name) else state[name]
            for name in model_parameter_names(list(state))}


def lengths(batch: int, n: int) -> torch.Tensor:
    """`[batch]` int64 filled with n (cache or token lengths of an unpadded batch)."""
    return torch.full((batch,), n, dtype=torch.int64)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's conversion-script permutation (Meta interleaved -> HF rotate-half)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_model_from_meta(cfg: ModelConfig, state: dict[str, torch.Tensor]):
    import transformers

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        sd[q + "self_attn.q_proj.weight"] = hf_permute(state[p + "attention.wq.weight"], cfg.n_heads)
        sd[q + "self_attn.k_proj.weight"] = hf_permute(state[p + "attention.wk.weight"], cfg.n_kv_heads)
        sd[q + "self_attn.v_proj.weight"] = state[p + "attention.wv.weight"]
        sd[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"]
        sd[q + "mlp.gate_proj.weight"] = state[p + "feed_forward.w1.weight"]
        sd[q + "mlp.up_proj.weight"] = state[p + "feed_forward.w3.weight"]
        sd[q + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"]
        sd[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    model.load_state_dict(sd, strict=True)
    return model


def write_meta(path: Path, cfg: ModelConfig, state, *, n_shards: int = 1) -> Path:
    save_meta_checkpoint(path, state, to_meta_params(cfg, multiple_of=MULTIPLE_OF), n_shards=n_shards)
    return path


def write_hf(path: Path, hf_model) -> Path:
    hf_model.save_pretrained(path)
    return path


def tiny_export(root: Path, *, seed: int, tp: int, name: str = "mha") -> tuple[Path, Path]:
    """(checkpoint, export directory) of the tiny MHA model with weights drawn from `seed`."""
    from llama_export.export.exporter import ExportOptions, export

    cfg = tiny_config("mha")
    ckpt = write_meta(root / name, cfg, random_meta_state(cfg, seed=seed))
    return ckpt, export(ExportOptions(checkpoint=ckpt, out=root / "graphs", tp=tp, progress=False))


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llama_export.cli ARGS` in a subprocess (real rank processes for tp > 1)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llama_export.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
    )


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
