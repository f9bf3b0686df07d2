"""Bad input refused in the library (the CLI cases, with exit code and message: tests/test_error_table.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_export.errors import CheckpointError, ConfigError
from llama_export.model.checkpoint import build_model, load_config
from tests.helpers import random_meta_state, tiny_config, write_meta


def test_pth_is_loaded_with_weights_only(tmp_path):
    """A pickle that would run code on load is refused (weights_only=True)."""
    cfg = tiny_config("mha")
    state = random_meta_state(cfg, seed=3)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = write_meta(tmp_path / "evil", cfg, state)
    torch.save({**state, "evil": Evil()}, bad / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_model(bad)


def test_max_seq_len_overrides_the_checkpoints(tmp_path):
    """`export --max-seq-len` wins over a params.json that names max_seq_len (the demo's does)."""
    ckpt = write_meta(tmp_path / "m", tiny_config("mha"), random_meta_state(tiny_config("mha")))
    assert load_config(ckpt).max_seq_len == 64
    assert load_config(ckpt, max_seq_len=32).max_seq_len == 32


@pytest.mark.parametrize("field,value,match", [
    ("n_layers", 2.0, "n_layers=2.0 should be a valid integer"),
    ("n_heads", True, "n_heads=True should be a valid integer"),
    ("rope_theta", float("nan"), "rope_theta=nan should be a finite number"),
    ("norm_eps", 0.0, "norm_eps=0.0 should be greater than 0"),
    ("max_seq_len", 1, "max_seq_len=1 should be greater than or equal to 2"),
])
def test_a_model_config_built_in_code_holds_the_same_ranges(field, value, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(tiny_config("mha"), **{field: value})
