"""Any Hugging Face fast tokenizer (`tokenizer.json`) through the `tokenizers` library, with the
conventions of transformers 5: special tokens and the chat template from tokenizer_config.json.

BOS/EOS on encode: what tokenizer.json's post-processor adds, nothing without one. Like transformers 5
(checked against 5.24), `add_bos_token`/`add_eos_token` in tokenizer_config.json are not consulted when a
tokenizer.json exists.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from llama_export.errors import InputError
from llama_export.text.base import Message, Tokenizer, TokenizerFormat
from llama_export.text.chat import render_chat_template
from llama_export.text.files import TokenizerSettings


class HFTokenizer(Tokenizer):
    """`tokenizers.Tokenizer` plus tokenizer_config.json; chat through the jinja chat template."""

    format = TokenizerFormat.HF_TOKENIZERS

    def __init__(self, path: Path, settings: TokenizerSettings, *, extra_stop_ids: Sequence[int] = (),
                 source: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        super().__init__(source=source)
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise InputError(f"{path} is not a tokenizer.json the tokenizers library can read ({e}); "
                             "restore it from the original checkpoint") from None
        self.settings = settings
        self.bos_id = self._token_id("bos_token")
        self.eos_id = self._token_id("eos_token")
        self.stop_ids = frozenset(([self.eos_id] if self.eos_id is not None else []) + list(extra_stop_ids))

    def _token_id(self, name: str) -> int | None:
        text = self.settings.special_tokens.get(name)
        if text is None:
            return None
        i = self.tok.token_to_id(text)
        if i is None:
            raise InputError(f"{self.source}: {name} {text!r} is not in tokenizer.json's vocabulary; "
                             "the tokenizer files do not belong together")
        return i

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """From tokenizer.json, where its pipeline keeps every input byte (`_keeps_every_byte`): the
        longest vocabulary or added token in UTF-8 bytes bounds the input bytes of one token (a byte-level
        character, a '▁' for a space or a '<0x0A>' byte token is at least the one byte it stands for)."""
        spec = json.loads(self.tok.to_str())
        if not _keeps_every_byte(spec):
            return None
        vocab = spec["model"].get("vocab") or {}
        added = [t.get("content", "") for t in spec.get("added_tokens") or ()]
        return max([1] + [len(t.encode("utf-8")) for t in [*vocab, *added]])

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def has_chat_template(self) -> bool:
        return self.settings.chat_template is not None

    def chat_text(self, messages: Sequence[Message]) -> str:
        """The rendered chat template (before tokenization)."""
        return render_chat_template(self.settings.chat_template, messages,
                                    special_tokens=self.settings.special_tokens, source=self.source)

    def _chat(self, messages: Sequence[Message]) -> list[int]:
        # transformers tokenizes the rendered text without adding special tokens: the template has them.
        return self.encode(self.chat_text(messages), add_special_tokens=False)


# tokenizer.json pieces that never shrink or drop input text (Llama 2 and Llama 3 use only these).
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


def _keeps_every_byte(spec: dict) -> bool:
    """Whether every input byte reaches the BPE model and comes out inside some token: no added token
    that strips whitespace beside it, normalizers that only add (Prepend, Replace of a string by one at least as long), pre-tokenizers that only split or
    map bytes to characters, and a BPE model that cannot emit <unk> (byte fallback, or a byte-level
    vocabulary holding all 256 byte characters)."""
    def steps(node: dict | None, key: str) -> list[dict]:
        if node is None:
            return []
        return [s for n in node[key] for s in steps(n, key)] if node.get("type") == "Sequence" else [node]

    for n in steps(spec.get("normalizer"), "normalizers"):
        pattern = n.get("pattern") or {}
        if not (n.get("type") == "Prepend" or n.get("type") == "Replace" and "String" in pattern
                and len(n.get("content", "").encode()) >= len(pattern["String"].encode()) > 0):
            return False
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or ()):
        return False  # such a token also swallows the whitespace beside it, any amount
    pre = steps(spec.get("pre_tokenizer"), "pretokenizers")
    if any(p.get("type") not in _SAFE_PRE_TOKENIZERS or p.get("behavior") == "Removed" for p in pre):
        return False
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return False
    if model.get("byte_fallback"):
        return True
    from tokenizers.pre_tokenizers import ByteLevel

    return any(p.get("type") == "ByteLevel" for p in pre) and set(ByteLevel.alphabet()) <= set(model.get("vocab", {}))
