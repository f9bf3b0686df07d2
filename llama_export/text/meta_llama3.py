"""Meta's Llama 3 tokenizer: a tiktoken BPE file plus Meta's 256 special tokens, and Meta's chat format.

Follows `tokenizer.py` and `chat_format.py` of Meta's llama3 / llama-models repositories: the special
tokens take the ids right after the BPE ranks, in the order below (Llama 3.1+ names; Llama 3.0 called ids
4, 5, 8, 10, 11 `<|reserved_special_token_0..4|>`-style names, with the same ids); text is split by the
Llama 3 regex; special-token text in a prompt is encoded as plain text (`disallowed_special=()`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Iterator, Sequence

from llama_export.errors import InputError
from llama_export.text.base import Message, Tokenizer, TokenizerFormat

# Meta's split pattern (tokenizer.py, `pat_str`).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
# The rest are reserved, numbered from 2 on (0 and 1 are named above).
SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# tiktoken panics on very long inputs and on very long runs of (non-)whitespace; Meta encodes pieces of
# at most this many characters, and cuts runs longer than the second limit (tiktoken issue 195).
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def parse_tiktoken_ranks(data: bytes, *, source: str) -> dict[bytes, int]:
    """`base64-token rank` lines -> {token bytes: rank}; ranks must be 0..n-1 (they are the ids).

    (tiktoken's own `load_tiktoken_bpe` takes a path and caches local files under /tmp by path name, so
    a changed file at the same path would be read stale.)"""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise InputError(f"{source}: line {n} is not 'base64-token rank'; restore the file") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{source}: BPE ranks are not 0..{len(ranks) - 1} without gaps or repeats; restore the file")
    return ranks


def _meta_pieces(text: str) -> Iterator[str]:
    """Meta's cuts of a long input: pieces of <= 400k characters, and within each a cut wherever a run
    of whitespace (or of non-whitespace) reaches 25k characters."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        piece = text[start:start + _MAX_ENCODE_CHARS]
        cut, pos = 0, 0
        for _, run in itertools.groupby(piece, key=str.isspace):
            n = len(list(run))
            for k in range(_MAX_RUN_CHARS, n, _MAX_RUN_CHARS):
                yield piece[cut:pos + k]
                cut = pos + k
            pos += n
        yield piece[cut:]


class MetaLlama3Tokenizer(Tokenizer):
    """tiktoken with Meta's Llama 3 pattern and special tokens; BOS = <|begin_of_text|>."""

    format = TokenizerFormat.META_LLAMA3

    def __init__(self, data: bytes, *, extra_stop_ids: Sequence[int] = (), source: str, name: str = "llama3") -> None:
        import tiktoken

        super().__init__(source=source)
        ranks = parse_tiktoken_ranks(data, source=source)
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        # Text is encoded as bytes, without normalization; special-token text is encoded as plain text.
        self._max_token_bytes = max(map(len, ranks), default=1)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset([self.special_tokens[t] for t in STOP_TOKENS] + list(extra_stop_ids))

    @property
    def max_token_bytes(self) -> int:
        return self._max_token_bytes

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_id] if add_special_tokens else []
        for piece in _meta_pieces(text):
            ids += self.enc.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        if skip_special:
            special = set(self.special_tokens.values())
            ids = [i for i in ids if i not in special]
        return self.enc.decode(list(ids))

    @property
    def has_chat_template(self) -> bool:
        return True

    def _header(self, role: str) -> list[int]:
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(role, add_special_tokens=False)
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n", add_special_tokens=False))

    def _chat(self, messages: Sequence[Message]) -> list[int]:
        """Meta's `encode_dialog_prompt`: BOS, per message header + stripped content + <|eot_id|>, then
        the assistant header."""
        ids = [self.bos_id]
        for m in messages:
            ids += self._header(m["role"]) + self.encode(m["content"].strip(), add_special_tokens=False)
            ids.append(self.special_tokens["<|eot_id|>"])
        return ids + self._header("assistant")
