"""The committed demo model loads, tokenizes Python exactly, splits for tp 1/2/4 and decodes Python-ish text."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from llama_export.demo import DEMO_DIR
from llama_export.model.checkpoint import build_model, load_config
from llama_export.parallel.plan import RankShape, check_tp

SNIPPET = '''class Point:
    """A 2-D point."""

    def __init__(self, x: float, y: float = 0.0) -> None:
        self.x, self.y = x, y

\tdef norm(self):  # tab-indented, non-ASCII: é → ∞
        return (self.x ** 2 + self.y ** 2) ** 0.5
'''


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(DEMO_DIR / "tokenizer.model"))


@pytest.fixture(scope="module")
def model():
    return build_model(DEMO_DIR)


def test_files_are_fp16_meta_checkpoint_of_a_few_mb() -> None:
    pth = DEMO_DIR / "consolidated.00.pth"
    assert (DEMO_DIR / "params.json").is_file() and (DEMO_DIR / "MODEL_CARD.md").is_file()
    assert pth.stat().st_size <= 6 * 2**20
    state = torch.load(pth, map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float16}


def test_tokenizer_round_trips_python_and_matches_config(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode(SNIPPET)
    assert sp.decode(ids) == SNIPPET
    assert len(ids) < len(SNIPPET.encode()) / 1.5  # BPE merges, not mostly byte fallback
    assert (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert sp.get_piece_size() == load_config(DEMO_DIR).vocab_size


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_config_is_valid_for_tp(tp: int) -> None:
    cfg = load_config(DEMO_DIR)
    check_tp(cfg, tp)
    shapes = [RankShape(cfg, tp, r) for r in range(tp)]
    assert sum(s.local_heads for s in shapes) == cfg.n_heads
    assert sum(s.local_hidden for s in shapes) == cfg.hidden_dim


@torch.no_grad()
def test_greedy_decoding_looks_like_python_with_clear_margins(model, sp: spm.SentencePieceProcessor) -> None:
    from llama_export.engine.batch import generate

    ids = [sp.bos_id(), *sp.encode("def ")]
    steps = generate(model.step, torch.tensor([ids]), model.empty_cache(1, len(ids) + 33), max_new_tokens=33).steps
    logits = torch.from_numpy(steps[0].logits)
    out, margins = [], []
    for _ in range(32):
        top = logits[0].topk(2)
        margins.append((top.values[0] - top.values[1]).item())
        nxt = int(top.indices[0])
        if nxt == sp.eos_id():
            break
        out.append(nxt)
        logits = torch.from_numpy(steps[len(out)].logits)
    text = "def " + sp.decode(out)

    assert len(out) >= 16, text
    assert any(tok in text for tok in ("(", ":", "self", "return", "=")), text
    assert sum(margins) / len(margins) > 0.5, (margins, text)
