"""A text's least token count from its UTF-8 bytes (`Tokenizer.max_token_bytes`), so that a prompt that
cannot fit the context is refused before it is tokenized: the bound must never exceed the real count."""

from __future__ import annotations

import json
import math
import random

import pytest

from llama_export.demo import DEMO_DIR
from llama_export.errors import InputError
from llama_export.text import load_tokenizer, text_files_in
from tests.llama3_text import CORPUS, write_hf_files, write_meta_tokenizer

TEXTS = CORPUS[:7] + [
    "Hello, wörld! 🤖 12345678 x", " " * 200, "\n" * 50 + "x", "ÿÿÿ ☃☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a", "日本語" * 40,
    "<|begin_of_text|><|eot_id|>", "\x00\x01\x7f", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


def _random_texts(n: int = 50) -> list[str]:
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), 0x2581, 0x3000, 0x1F600, 0xFF21, 0x200B]]
    return ["".join(rng.choice(alphabet + ["  ", "\n", "def ", "return"]) for _ in range(rng.randint(1, 300)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bound")
    write_hf_files(root / "hf")
    write_meta_tokenizer(root / "meta")
    return {name: load_tokenizer(text_files_in(folder), source=name)
            for name, folder in (("demo", DEMO_DIR), ("hf", root / "hf"), ("meta", root / "meta"))}


@pytest.mark.parametrize("name", ["demo", "hf", "meta"])
def test_the_bound_never_exceeds_the_real_token_count(tokenizers, name):
    tok = tokenizers[name]
    bound = tok.max_token_bytes
    assert bound is not None and 1 <= bound <= 64
    for text in TEXTS + _random_texts():
        n = len(text.encode("utf-8"))
        assert len(tok.encode(text, add_special_tokens=False)) >= math.ceil(n / bound), (name, text)


@pytest.mark.parametrize("name", ["demo", "hf", "meta"])
def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(tokenizers, name, monkeypatch):
    tok = tokenizers[name]
    monkeypatch.setattr(tok, "encode", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(InputError, match=r"the prompt \(10,000,000 bytes, so at least [\d,]+ tokens\) exceeds the "
                       r"context limit max_seq_len=256; shorten it"):
        tok.check_fits("x" * 10_000_000, limit=256, limit_name="max_seq_len=256")
    tok.check_fits("x" * 255, limit=256, limit_name="max_seq_len=256")  # may fit: left to the tokenizer


def test_normalizers_that_can_shrink_text_give_no_bound(tmp_path):
    """NFKC maps a 3-byte fullwidth 'Ａ' to 'A', Strip drops whitespace, an lstrip token swallows the
    spaces before it: no bound from the vocabulary."""
    write_hf_files(tmp_path / "hf")
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    for normalizer in ({"type": "NFKC"}, {"type": "Strip", "strip_left": True, "strip_right": True},
                       {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "x"}, {"type": "NFKC"}]}):
        (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": normalizer}))
        tok = load_tokenizer(text_files_in(tmp_path / "hf"), source="hf")
        assert tok.max_token_bytes is None
        tok.check_fits("x" * 10_000, limit=256, limit_name="max_seq_len=256")  # nothing known: not refused
    added = [{**t, "lstrip": True} if t["content"] == "<|eot_id|>" else t for t in spec["added_tokens"]]
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({**spec, "added_tokens": added}))
    assert load_tokenizer(text_files_in(tmp_path / "hf"), source="hf").max_token_bytes is None
