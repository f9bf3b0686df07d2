"""Bad input: a clear one-line error naming problem and fix, exit code 2, no traceback."""

from __future__ import annotations

import json

import pytest
import torch

from llama_export.errors import CheckpointError
from llama_export.model.checkpoint import build_model
from tests.helpers import hf_model_from_meta, random_meta_state, run_cli, tiny_config, write_hf, write_meta


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    cfg = tiny_config("mha")
    state = random_meta_state(cfg, seed=3)
    return cfg, state, write_meta(root / "meta", cfg, state), write_hf(root / "hf", hf_model_from_meta(cfg, state))


def _fails_cleanly(*args, match: str):
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error")]
    assert lines, r.stderr
    assert match in r.stderr, r.stderr
    return r.stderr


def _run_args(ckpt, *extra, ids="1,2,3", new="4"):
    return ("run", "--checkpoint", str(ckpt), "--prompt-ids", ids, "--max-new-tokens", new, *extra)


def test_missing_checkpoint_dir(tmp_path):
    _fails_cleanly(*_run_args(tmp_path / "nope"), match="does not exist")


def test_truncated_pth(ckpts, tmp_path):
    cfg, state, meta, _ = ckpts
    bad = write_meta(tmp_path / "bad", cfg, state)
    f = bad / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails_cleanly(*_run_args(bad), match="truncated or corrupt")


def test_truncated_safetensors(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "hf"
    shutil.copytree(ckpts[3], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _fails_cleanly(*_run_args(bad), match="truncated or corrupt")


def test_missing_key(ckpts, tmp_path):
    cfg, state, _, _ = ckpts
    partial = {k: v for k, v in state.items() if k != "layers.1.feed_forward.w2.weight"}
    bad = write_meta(tmp_path / "bad", cfg, partial)
    _fails_cleanly(*_run_args(bad), match="missing ['layers.1.feed_forward.w2.weight']")


def test_shape_mismatch_against_params_json(ckpts, tmp_path):
    cfg, state, meta, _ = ckpts
    bad = write_meta(tmp_path / "bad", cfg, state)
    params = json.loads((bad / "params.json").read_text())
    params["n_layers"] = 2
    params["dim"] = 128  # weights are dim 64
    (bad / "params.json").write_text(json.dumps(params))
    _fails_cleanly(*_run_args(bad), match="params.json implies")


def test_hf_shape_mismatch_against_config_json(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "hf"
    shutil.copytree(ckpts[3], bad)
    cfgj = json.loads((bad / "config.json").read_text())
    cfgj["intermediate_size"] = 200
    (bad / "config.json").write_text(json.dumps(cfgj))
    _fails_cleanly(*_run_args(bad), match="config.json implies")


def test_tp_that_does_not_divide_heads(ckpts):
    _fails_cleanly(*_run_args(ckpts[2], "--tp", "3"), match="valid tp: 1, 2, 4")


def test_token_outside_vocabulary(ckpts):
    _fails_cleanly(*_run_args(ckpts[2], ids="1,2,101"), match="token id 101 is outside the vocabulary [0, 101)")


def test_prompt_beyond_context(ckpts):
    _fails_cleanly(*_run_args(ckpts[2], new="62"), match="exceeds the context limit max_seq_len=64")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    _fails_cleanly(*_run_args(tmp_path), match="neither params.json")


def test_pth_is_loaded_with_weights_only(ckpts, tmp_path):
    """A pickle that would run code on load is refused (weights_only=True)."""
    cfg, state, _, _ = ckpts

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = write_meta(tmp_path / "evil", cfg, state)
    torch.save({**state, "evil": Evil()}, bad / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_model(bad)
