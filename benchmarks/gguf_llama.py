"""A llama.cpp GGUF (f32 / q8_0 / q4_0) of a checkpoint's weights, written one tensor at a time.

Used by the peer benchmarks (bench_peers.py, bench_8b_int4.py); needs the `gguf` package
(`pip install gguf==0.19.0`), which is never a dependency of llama_export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight", "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}
QTYPES = ("f32", "q8_0", "q4_0")
_ROWS_PER_CHUNK = 4096  # rows quantized at once: bounds numpy's temporaries (the embedding has 128256)


def gguf_name(meta: str) -> str:
    """llama.cpp's tensor name for a Meta parameter name."""
    if meta in _TOP_NAMES:
        return _TOP_NAMES[meta]
    _, i, rest = meta.split(".", 2)
    return f"blk.{i}.{_LAYER_NAMES[rest]}"


def rope_freq_factors(cfg):
    """llama.cpp's `rope_freqs.weight` for Llama-3.1 RoPE scaling: per frequency, the divisor that turns
    the base frequency into the scaled one (llama.cpp divides each base frequency by it), or None."""
    import torch

    from llama_export.model.layers import apply_rope_scaling

    if cfg.rope_scaling is None:
        return None
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    return (base / apply_rope_scaling(base, cfg.rope_scaling)).float().numpy()


def write_gguf(cfg, get: Callable[[str], object], out: Path, qtype: str, *, name: str = "llama-export-bench") -> None:
    """A llama-architecture GGUF of the model `cfg` whose tensors `get(meta_name)` returns (torch, Meta
    layout), fetched and written one at a time in `expected_shapes` order, so memory holds one fp32
    tensor and its quantized copy. q/k stay in Meta's interleaved row order: llama.cpp's LLaMA RoPE is
    the interleaved (GPT-J style "NORM") rotation, and its HF converter permutes HF rows back to it.
    Every 2-D tensor (embedding and output included, like llama-quantize --pure) gets `qtype`; norms
    stay f32; Llama-3.1 RoPE scaling becomes `rope_freqs.weight` as llama.cpp's converter writes it.
    The vocabulary is a placeholder SentencePiece list (ids are fed directly). Written to
    `out.partial`, renamed to `out` when complete."""
    import gguf
    import numpy as np

    from llama_export.model.checkpoint import expected_shapes

    q = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]
    tmp = out.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_file_type(ftype)
    w.add_vocab_size(cfg.vocab_size)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             *([gguf.TokenType.BYTE] * 256)]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), cfg.vocab_size)]
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(cfg.vocab_size)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    # Tensor infos first (the header lists every tensor's type, shape and offset), then the data.
    shapes = expected_shapes(cfg)
    freqs = rope_freq_factors(cfg)
    if freqs is not None:
        w.add_tensor_info("rope_freqs.weight", freqs.shape, np.float32, freqs.nbytes)
    for meta, shape in shapes.items():
        if len(shape) == 2 and q is not gguf.GGMLQuantizationType.F32:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, q)
            w.add_tensor_info(gguf_name(meta), byte_shape, np.uint8, byte_shape[0] * byte_shape[1], raw_dtype=q)
        else:
            n = 1
            for s in shape:
                n *= s
            w.add_tensor_info(gguf_name(meta), shape, np.float32, 4 * n)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    if freqs is not None:
        w.write_tensor_data(freqs)
    for meta, shape in shapes.items():
        a = get(meta).float().numpy()
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{meta}: shape {tuple(a.shape)}, expected {tuple(shape)}")
        if a.ndim == 2 and q is not gguf.GGMLQuantizationType.F32:
            packed = np.empty(gguf.quant_shape_to_byte_shape(a.shape, q), dtype=np.uint8)
            for r in range(0, a.shape[0], _ROWS_PER_CHUNK):
                packed[r:r + _ROWS_PER_CHUNK] = gguf.quants.quantize(a[r:r + _ROWS_PER_CHUNK], q)
            w.write_tensor_data(packed)
        else:
            w.write_tensor_data(np.ascontiguousarray(a, dtype=np.float32))
        del a
    w.close()
    tmp.rename(out)


def checkpoint_to_gguf(checkpoint: Path, out: Path, qtype: str, *, name: str = "llama-export-bench") -> None:
    """`write_gguf` of a checkpoint folder (Meta or HF, any dtype), read one tensor at a time through
    llama_export's own loader (HF q/k rows come back in Meta's order), upcast to fp32 per tensor."""
    import torch

    from llama_export.model.checkpoint import RankWeights, load_config
    from llama_export.parallel.plan import RankShape

    cfg = load_config(checkpoint)
    with RankWeights(checkpoint, RankShape(cfg, 1, 0), dtype=torch.float32) as weights:
        write_gguf(cfg, weights.get, out, qtype, name=name)
