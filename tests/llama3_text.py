"""A small Llama-3-style tokenizer built offline, in both of Llama 3's file formats.

A byte-level BPE is trained with the `tokenizers` library on the Llama 3 split pattern; Meta's 256
special tokens follow the merges. `write_hf_files` writes it as Hugging Face does for Llama 3
(tokenizer.json with a BOS post-processor, tokenizer_config.json with the Llama 3 chat template,
generation_config.json); `write_meta_tokenizer` writes the same merges as Meta's tiktoken `tokenizer.model`
(`base64(token bytes) rank` per line, rank = id).
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from llama_export.text.meta_llama3 import LLAMA3_PATTERN, SPECIAL_TOKENS

# Llama 3 Instruct's chat template as published in its tokenizer_config.json.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 12345 more.",
    "Café, naïve, façade, résumé, Straße, Ærø — accents and ligatures: œuvre, ÿ.",
    "Emoji: 😀 🎉 🚀 👍🏽 ❤️ and CJK: 你好，世界。日本語のテキスト。한국어 텍스트.",
    "def main():\n    print('hello world')\n    return 0\n\n\nif __name__ == '__main__':\n    main()\n",
    "Numbers 3.14159, 2.71828 and 1000000; URLs like https://example.com/path?q=1.",
    "    indented\ttabs\r\nwindows lines\r\n and   runs   of   spaces.",
    "I'm, you're, they've, she'd, we'll, it's: contractions THE'S DON'T.",
] * 4
N_BASE = 512  # BPE tokens (256 bytes + merges); special tokens take ids N_BASE .. N_BASE + 255
VOCAB = N_BASE + len(SPECIAL_TOKENS)


@functools.lru_cache(maxsize=1)
def _byte_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel pre-tokenizer's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@functools.lru_cache(maxsize=1)
def trained_tokenizer_json() -> str:
    """tokenizer.json text of the trained tokenizer (Llama 3's pipeline: Split on the pattern, ByteLevel
    without its own regex, BPE with ignore_merges, BOS post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N_BASE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == N_BASE, tok.get_vocab_size()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos = N_BASE + SPECIAL_TOKENS.index("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return tok.to_str()


def special_id(token: str) -> int:
    return N_BASE + SPECIAL_TOKENS.index(token)


def write_hf_files(folder: Path, *, chat_template: str | None = LLAMA3_CHAT_TEMPLATE,
                   generation_eos: int | list[int] | None = None, eos_token: str = "<|eot_id|>") -> Path:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json when `generation_eos` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(trained_tokenizer_json(), encoding="utf-8")
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": eos_token, "tokenizer_class": "PreTrainedTokenizerFast",
           "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    if generation_eos is not None:
        gen = {"bos_token_id": special_id("<|begin_of_text|>"), "eos_token_id": generation_eos}
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def write_meta_tokenizer(folder: Path) -> Path:
    """Meta's tokenizer.model for the same merges: one `base64(bytes) rank` line per BPE token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads(trained_tokenizer_json())["model"]["vocab"]
    to_byte = {c: b for b, c in _byte_unicode().items()}
    lines = [base64.b64encode(bytes(to_byte[c] for c in token)).decode() + f" {rank}"
             for token, rank in sorted(vocab.items(), key=lambda kv: kv[1])]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder / "tokenizer.model"
