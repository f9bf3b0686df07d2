"""The text files of a model (tokenizer, tokenizer config, chat template, generation config) and the one
place that reads their contents.

Every JSON field the text side uses is read here, through a typed schema (`parsing.parse_json_file`):
`SpecialTokensMap`, `TokenizerConfig`, `GenerationConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llama_export.errors import InputError
from llama_export.gguf_file import checkpoint_gguf, open_gguf
from llama_export.parsing import parse_json_file

# Tokenizer files in order of preference: a Hugging Face `tokenizer.json` carries the conventions
# (post-processor, added tokens) its tokenizer_config.json and chat template are written against.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
# Everything text generation may need; an export carries the ones its checkpoint has.
TEXT_FILES = TOKENIZER_FILES + CONFIG_FILES

# Named special tokens as transformers passes them to a chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

TextFiles = Mapping[str, Path]  # file name (one of TEXT_FILES) -> where it is


def text_files_in(folder: Path) -> dict[str, Path]:
    """The text files present in a checkpoint folder (or any folder laid out like one); for a GGUF
    checkpoint (`gguf_file.checkpoint_gguf`), the ones its metadata holds (`text.gguf`)."""
    gguf = checkpoint_gguf(folder)
    if gguf is not None:
        from llama_export.text.gguf import gguf_text_files

        return gguf_text_files(open_gguf(gguf))
    return {name: Path(folder) / name for name in TEXT_FILES if (Path(folder) / name).is_file()}


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json / special_tokens_map.json / chat_template.jinja say."""

    special_tokens: Mapping[str, str]  # SPECIAL_TOKEN_NAMES present -> token text
    chat_template: str | None = None


def _token_text(value: Any) -> str | None:
    """A special token as written by transformers: a string, or an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError('must be a string or {"content": ...}')


def _chat_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (transformers
    picks "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"lists templates {sorted(map(str, named))} but none named 'default'; name one 'default'")
    raise ValueError("must be a string or a list of {name, template}")


def _token_ids(value: Any) -> tuple[int, ...]:
    """generation_config.json's eos_token_id: an int or a list of ints (absent: none)."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in ids):
        raise ValueError("must be a token id or a list of token ids")
    return tuple(ids)


SpecialToken = Annotated[Any, AfterValidator(_token_text)]


class SpecialTokensMap(BaseModel):
    """special_tokens_map.json (and the same fields of tokenizer_config.json)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    bos_token: SpecialToken = None
    eos_token: SpecialToken = None
    unk_token: SpecialToken = None
    sep_token: SpecialToken = None
    pad_token: SpecialToken = None
    cls_token: SpecialToken = None
    mask_token: SpecialToken = None


class TokenizerConfig(SpecialTokensMap):
    """tokenizer_config.json: the fields the text side uses."""

    chat_template: Annotated[Any, AfterValidator(_chat_template)] = None


class GenerationConfig(BaseModel):
    """generation_config.json: the fields the text side uses (stop ids, and the sampling a request gets
    unless it says otherwise; transformers' semantics: without do_sample, greedy)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    eos_token_id: Annotated[Any, AfterValidator(_token_ids)] = ()
    do_sample: bool = False
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 50


_FIX = "fix the file (see the model's original)"


def read_tokenizer_settings(files: TextFiles) -> TokenizerSettings:
    """Special tokens and chat template, with transformers' precedence: a
    chat_template.jinja file wins over the config's entry, tokenizer_config.json over
    special_tokens_map.json."""
    special: dict[str, str] = {}
    template = None
    for name, schema in (("special_tokens_map.json", SpecialTokensMap), ("tokenizer_config.json", TokenizerConfig)):
        if name not in files:  # the later file wins
            continue
        d = parse_json_file(files[name], schema, fix=_FIX, error=InputError)
        special.update({t: text for t in SPECIAL_TOKEN_NAMES if (text := getattr(d, t)) is not None})
        template = getattr(d, "chat_template", template)
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"].read_text(encoding="utf-8")
    return TokenizerSettings(special_tokens=special, chat_template=template)


def read_generation_config(files: TextFiles) -> GenerationConfig | None:
    """generation_config.json, or None when the model has none."""
    if "generation_config.json" not in files:
        return None
    return parse_json_file(files["generation_config.json"], GenerationConfig, fix=_FIX, error=InputError)
