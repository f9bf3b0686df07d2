"""Tiny GGUFs written with gguf-py's own writer, the way llama.cpp's converter writes a LLaMA.

q/k rows go through the two permutations a real file went through, each written here independently of
the package: Meta -> HF (`tests.helpers.hf_permute`, HF's conversion script), then HF -> GGUF
(llama.cpp convert_hf_to_gguf `LlamaModel.permute`: reshape(heads, 2, hd/2, dim).swapaxes(1, 2)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llama_export.config import ModelConfig
from tests.helpers import hf_permute

NAMES = {"attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k", "attention.wv.weight": "attn_v",
         "attention.wo.weight": "attn_output", "feed_forward.w1.weight": "ffn_gate",
         "feed_forward.w2.weight": "ffn_down", "feed_forward.w3.weight": "ffn_up",
         "attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm"}
TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}


def gguf_tensor_name(meta_name: str) -> str:
    if meta_name in TOP:
        return TOP[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"blk.{i}.{NAMES[rest]}.weight"


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, factor=8.0, low=1.0, high=4.0, old_ctx=8192) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf LlamaModel.generate_extra_tensors computes it."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], *, qtype: str = "F32",
               tied: bool = False, tokenizer: Callable | None = None, rope_freqs: np.ndarray | None = None,
               skip: tuple[str, ...] = (), skip_tensors: tuple[str, ...] = (), metadata: dict | None = None,
               tensor: Callable[[str, np.ndarray], tuple[np.ndarray, str]] | None = None) -> Path:
    """`state` (Meta names and layout) as a LLaMA GGUF: 2-D weights as `qtype` (quantized with
    gguf.quants), norms F32; `tokenizer(writer)` adds tokenizer metadata; `skip` leaves metadata keys
    out; `metadata` overrides keys (key -> value, written with the type gguf-py picks); `tensor(name,
    array)` may replace a tensor's (data, type) as written."""
    import gguf

    w = gguf.GGUFWriter(str(path), (metadata or {}).get("general.architecture", "llama"))
    keys = {"llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
            "llama.block_count": cfg.n_layers, "llama.feed_forward_length": cfg.hidden_dim,
            "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
            "llama.rope.freq_base": cfg.rope_theta, "llama.attention.layer_norm_rms_epsilon": cfg.norm_eps,
            "llama.rope.dimension_count": cfg.head_dim, "llama.vocab_size": cfg.vocab_size,
            **{k: v for k, v in (metadata or {}).items() if k != "general.architecture"}}
    for k, v in keys.items():
        if k in skip:
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    if tokenizer is not None:
        tokenizer(w)
    for name, t in state.items():
        if tied and name == "output.weight" or gguf_tensor_name(name) in skip_tensors:
            continue
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = cfg.n_heads if "wq" in name else cfg.n_kv_heads
            t = llama_cpp_permute(hf_permute(t, heads), heads)
        a = t.float().numpy()
        kind = "F32" if a.ndim == 1 else qtype
        data = a if kind == "F32" else gguf.quants.quantize(a, gguf.GGMLQuantizationType[kind])
        if tensor is not None:
            data, kind = tensor(gguf_tensor_name(name), data)
        w.add_tensor(gguf_tensor_name(name), data, raw_dtype=gguf.GGMLQuantizationType[kind])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
