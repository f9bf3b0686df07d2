"""Config mapping from Meta params.json and Hugging Face config.json spellings."""

from __future__ import annotations

import pytest

from llama_export.config import ModelConfig, RopeScaling
from llama_export.errors import ConfigError

LLAMA32_1B_META = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                   "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                   "use_scaled_rope": True}


def test_meta_llama3_params():
    c = ModelConfig.from_meta_params(LLAMA32_1B_META)
    assert (c.hidden_dim, c.head_dim, c.n_rep) == (8192, 64, 4)  # HF's intermediate_size for this model
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)  # Meta's Llama 3.1 constants
    c32 = ModelConfig.from_meta_params({**LLAMA32_1B_META, "rope_scaling_factor": 32})
    assert c32.rope_scaling.factor == 32.0


def test_llama2_7b_hidden_dim():
    c = ModelConfig.from_meta_params({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                      "norm_eps": 1e-06, "vocab_size": 32000})
    assert c.hidden_dim == 11008 and c.n_kv_heads == 32 and c.rope_scaling is None


def test_hf_transformers4_rope_scaling_spelling():
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 99, "intermediate_size": 128, "rope_theta": 500000.0, "max_position_embeddings": 128,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    c = ModelConfig.from_hf_config(cfg)
    assert c.rope_theta == 500000.0 and c.rope_scaling.factor == 32.0 and c.max_seq_len == 128


@pytest.mark.parametrize("bad,match", [
    ({"vocab_size": -1}, "LLaMA 1 wrote -1"),
    ({"n_kv_heads": 3}, "not divisible by n_kv_heads=3"),
])
def test_meta_params_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_meta_params({**LLAMA32_1B_META, **bad})


def test_unknown_rope_type_is_refused():
    with pytest.raises(ConfigError, match="unsupported rope_type='yarn'"):
        ModelConfig.from_hf_config({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                    "vocab_size": 10, "intermediate_size": 8,
                                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})


def test_dtype_table_spells_every_library_alike():
    """`llama_export.dtypes` spells ONNX element types as numbers (so that running imports no onnx) and
    torch types lazily: each must be what onnx, torch and numpy call that name."""
    import numpy as np
    import onnx
    import torch

    from llama_export import dtypes

    for d in dtypes.DTYPES:
        assert onnx.TensorProto.DataType.Name(d.onnx) == {"float32": "FLOAT", "float16": "FLOAT16",
                                                           "bfloat16": "BFLOAT16", "float64": "DOUBLE"}.get(
            d.name, d.name.upper()), d
        assert d.torch == getattr(torch, d.name) and dtypes.by_torch(d.torch) is d
        assert d.is_float == d.torch.is_floating_point
        if d.name != "bfloat16":
            assert np.dtype(d.name).name == d.name
