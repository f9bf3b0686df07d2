"""Perplexity (`commands.evaluate`): the streamed sliding-window NLL equals one computed from full-sequence
logits of the transformers model with the same weights (an independent implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from llama_export.errors import InputError
from llama_export.model.transformer import Transformer
from llama_export.commands.evaluate import perplexity, plan_windows
from tests.helpers import hf_model_from_meta, packed_state, random_meta_state, tiny_config


def reference_nll(hf_model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Hugging Face's sliding-window recipe on full-sequence logits: window [jS, jS+W) scores its tokens
    from position max(1, jS+W-S) on (all of window 0 from position 1)."""
    n, total, scored, start = ids.numel(), 0.0, 0, 0
    while True:
        end = min(start + window, n)
        first = 1 if start == 0 else start + window - stride
        with torch.no_grad():
            logits = hf_model(ids[start:end].unsqueeze(0)).logits[0].double()  # [end-start, V]
        logp = torch.log_softmax(logits, -1)
        pos = torch.arange(first, end)
        total -= float(logp[pos - start - 1, ids[pos]].sum())
        scored += len(pos)
        if end == n:
            return total, scored
        start += stride


@pytest.mark.parametrize("n,window,stride,batch", [(61, 16, 6, 3), (16, 16, 8, 8), (40, 32, 31, 2)])
def test_perplexity_matches_full_sequence_reference(n, window, stride, batch):
    cfg = tiny_config("gqa")
    state = random_meta_state(cfg, seed=3)
    model = Transformer(cfg)
    model.load_state_dict(packed_state(state), strict=True)
    model.eval()
    hf = hf_model_from_meta(cfg, state)
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    got = perplexity(model.step, model.empty_cache, ids, window=window, stride=stride, batch=batch)
    want, scored = reference_nll(hf, ids, window, stride)
    assert got.scored == scored == n - 1
    assert got.nll == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want / scored), rel=1e-5)


def test_windows_score_every_token_once():
    for n, w, s in [(100, 10, 3), (11, 10, 9), (2, 4, 1), (257, 256, 128)]:
        covered = [t for _, f, e in plan_windows(n, w, s) for t in range(f, e)]
        assert covered == list(range(1, n))
        assert all(f - c <= w - 1 and e - c <= w for c, f, e in plan_windows(n, w, s))


@pytest.mark.parametrize("n,w,s", [(1, 8, 4), (10, 8, 8), (10, 8, 0)])
def test_bad_windows_are_refused(n, w, s):
    with pytest.raises(InputError):
        plan_windows(n, w, s)


TEXT = '''import os


def read_config(path):
    """Return the settings stored in the file at path."""
    settings = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings
'''


def test_eval_cli_on_the_demo_model(tmp_path, capsys):
    """`llama-export eval` (eager, the demo model) against transformers' full-sequence logits on the same
    weights and the demo tokenizer's ids, computed here."""
    import sentencepiece as spm

    from llama_export.demo import DEMO_DIR
    from llama_export.model.checkpoint import build_model, checkpoint_state, load_config
    from tests.helpers import read_json, run_cli

    text = tmp_path / "short.py"
    text.write_text(TEXT)
    r = run_cli("eval", "--text", str(text), "--window", "32", "--stride", "12", "--batch", "4",
                "--json", str(tmp_path / "ppl.json"), "--no-progress")
    assert r.returncode == 0, r.stderr
    got = read_json(tmp_path / "ppl.json")
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_DIR / "tokenizer.model"))
    ids = torch.tensor([sp.bos_id(), *sp.encode(TEXT)])
    cfg = load_config(DEMO_DIR)
    hf = hf_model_from_meta(cfg, checkpoint_state(build_model(DEMO_DIR)))  # Meta names, as the checkpoint's
    want, scored = reference_nll(hf, ids, 32, 12)
    assert got["tokens"] == ids.numel() and got["scored"] == scored and ids.numel() > 64
    assert got["nll"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want / scored), rel=1e-5)
    assert f"perplexity {got['perplexity']:.4f}" in r.stdout

    from llama_export.cli import main

    assert main(["eval", "--text", str(text), "--window", "999"]) == 2
    assert "--window 999 exceeds the model's context max_seq_len=256" in capsys.readouterr().err
    assert main(["eval", "--text", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
