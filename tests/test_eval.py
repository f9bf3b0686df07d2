"""Perplexity (`runner.evaluate`): the streamed sliding-window NLL equals one computed from full-sequence
logits of the transformers model with the same weights (an independent implementation)."""

from __future__ import annotations

import math

import pytest
import torch

from llama_export.errors import InputError
from llama_export.model.transformer import Transformer
from llama_export.runner.evaluate import perplexity, plan_windows
from tests.helpers import hf_model_from_meta, random_meta_state, tiny_config


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
    model.load_state_dict(state, strict=True)
    model.eval()
    hf = hf_model_from_meta(cfg, state)
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    got = perplexity(model, model.empty_cache, ids, window=window, stride=stride, batch=batch)
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
