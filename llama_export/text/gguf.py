"""A GGUF's tokenizer and chat template, written out as the text files the rest of this package reads.

A GGUF has no tokenizer.json: llama.cpp keeps the vocabulary (`tokenizer.ggml.tokens`, `.token_type`,
`.scores`), the merges, the special token ids, `add_bos_token` and `tokenizer.chat_template` as
metadata. They are built here, with the `tokenizers` library, into the files a Hugging Face checkpoint
carries (tokenizer.json, tokenizer_config.json, generation_config.json), so a GGUF's text side goes
through `text.hf.HFTokenizer` and an export of a GGUF carries its tokenizer like any other export.

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The vocabulary is already spelled in GPT-2's byte
  alphabet; `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer, rebuilt as the same regex splits, in
  order (`PRE_TOKENIZERS`; llama.cpp `llm_tokenizer_bpe`, src/llama-vocab.cpp).
- `"llama"`: sentencepiece BPE as llama.cpp runs it: merges recovered from the scores (the best-scoring
  pair first), byte fallback, '▁' for spaces and a '▁' before each piece of text (the start, and after
  each special token) when `tokenizer.ggml.add_space_prefix` (Llama 2's tokenizer.json normalizer).
Control tokens (token type 3) become special added tokens and user-defined ones (4) plain added tokens, so
the chat template's markers stay whole.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

from llama_export.errors import InputError
from llama_export.gguf_file import GGUFFile

log = logging.getLogger(__name__)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (the regexes llama.cpp splits with, one after the other; ignore_merges: a word that
# is a whole vocabulary entry is that token, as llama.cpp and Llama 3's tokenizer.json do)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt2": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),
    "llama-bpe": ((_LLAMA3,), True),
    "llama3": ((_LLAMA3,), True),
    "llama-v3": ((_LLAMA3,), True),
}
# llama.cpp's default for a file without tokenizer.ggml.add_bos_token: on for Llama 3 and sentencepiece
_ADDS_BOS = {"llama-bpe", "llama3", "llama-v3"}
_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}
_STOP_IDS = ("eos_token_id", "eot_token_id", "eom_token_id")  # llama.cpp ends generation at any of them


def gguf_text_files(g: GGUFFile) -> dict[str, Path]:
    """The GGUF's text files (file name -> path), written once per process into a temporary folder that
    is removed at exit; {} (with a warning) for a tokenizer this module cannot rebuild."""
    return dict(_written(g))


@functools.lru_cache(maxsize=4)
def _written(g: GGUFFile) -> tuple[tuple[str, Path], ...]:
    try:
        contents = text_file_contents(g)
    except _Unsupported as e:
        log.warning("%s: %s; it is used without a tokenizer (pass --prompt-ids)", g.path, e)
        return ()
    folder = Path(tempfile.mkdtemp(prefix="llama_export-gguf-text-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name, text in contents.items():
        (folder / name).write_text(text, encoding="utf-8")
    return tuple((name, folder / name) for name in contents)


class _Unsupported(Exception):
    pass


def text_file_contents(g: GGUFFile) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json of the GGUF, as text."""
    model = g.get("tokenizer.ggml.model")
    if model is None:
        raise _Unsupported("the GGUF has no tokenizer (no tokenizer.ggml.model)")
    tokens = g.get("tokenizer.ggml.tokens")
    if not tokens:
        raise InputError(f"{g.path} has tokenizer.ggml.model={model!r} but no tokenizer.ggml.tokens; the GGUF is "
                         "incomplete: convert the model again")
    types = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        pre = g.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise _Unsupported(f"its tokenizer uses llama.cpp's pre-tokenizer {pre!r}, which this tool does not rebuild "
                               f"(supported: {', '.join(PRE_TOKENIZERS)})")
        tok = _byte_level(tokens, g.get("tokenizer.ggml.merges") or [], pre)
        add_bos = g.get("tokenizer.ggml.add_bos_token", pre in _ADDS_BOS)
    elif model == "llama":
        scores = g.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise InputError(f"{g.path}: a sentencepiece tokenizer needs tokenizer.ggml.scores, one per token; the GGUF "
                             "is incomplete: convert the model again")
        tok = _sentencepiece(tokens, scores, types, unk=g.get("tokenizer.ggml.unknown_token_id"),
                             prefix=g.get("tokenizer.ggml.add_space_prefix", True))
        add_bos = g.get("tokenizer.ggml.add_bos_token", True)
    else:
        raise _Unsupported(f"its tokenizer is tokenizer.ggml.model={model!r}; supported: 'gpt2' (byte-level BPE), "
                           "'llama' (sentencepiece)")
    _add_special(tok, tokens, types)
    special = {}
    for name, key in _SPECIAL_IDS.items():
        i = g.get(f"tokenizer.ggml.{key}")
        if i is not None:
            if not 0 <= i < len(tokens):
                raise InputError(f"{g.path}: tokenizer.ggml.{key}={i} is not a token id (the vocabulary has "
                                 f"{len(tokens)}); the GGUF is corrupt: convert the model again")
            special[name] = tokens[i]
    _post_process(tok, special, add_bos=add_bos, add_eos=g.get("tokenizer.ggml.add_eos_token", False))
    config = dict(special)
    if (template := g.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    stop = list(dict.fromkeys(i for key in _STOP_IDS if (i := g.get(f"tokenizer.ggml.{key}")) is not None))
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
            "generation_config.json": json.dumps({"eos_token_id": stop}, indent=2)}


def _byte_level(tokens: list[str], merges: list[str], pre: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], scores: list[float], types: list[int], *, unk: int | None, prefix: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_by_score(tokens, scores), fuse_unk=True,
                               byte_fallback=True, unk_token=tokens[unk] if unk is not None else None))
    # llama.cpp (llm_tokenizer_spm) writes spaces as '▁' and, with add_space_prefix, puts one before every
    # piece of text (the start, and after each special token), as sentencepiece's dummy prefix does; the
    # normalizer of Llama 2's own tokenizer.json. (transformers' GGUF tokenizer uses a Metaspace
    # pre-tokenizer instead, which adds no '▁' before text that starts with a space.)
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    return tok


def _merges_by_score(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges the adjacent pair whose joined piece scores highest: every split of a
    piece into two pieces is a merge, ranked by the joined piece's score (ties: shorter left part)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                found.append((-score, len(left), len(right), vocab[left], vocab[right], left, right))
    return [(f[5], f[6]) for f in sorted(found)]


def _add_special(tok, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])


def _post_process(tok, special: dict[str, str], *, add_bos: bool, add_eos: bool) -> None:
    """BOS/EOS on encode, as the file says: transformers 5 (and `text.hf`) take them from the post-processor."""
    from tokenizers import processors

    bos = special.get("bos_token") if add_bos else None
    eos = special.get("eos_token") if add_eos else None
    if bos is None and eos is None:
        return
    ends = [t for t in (bos, eos) if t is not None]
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(ends)])
