"""The text files of a model (tokenizer, tokenizer config, chat template, generation config) and the one
place that reads their contents.

Every JSON field the text side uses is read here, so validation can be tightened in one spot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_export.config import load_json
from llama_export.errors import InputError

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
    """The text files present in a checkpoint folder (or any folder laid out like one)."""
    return {name: Path(folder) / name for name in TEXT_FILES if (Path(folder) / name).is_file()}


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json / special_tokens_map.json / chat_template.jinja say."""

    special_tokens: Mapping[str, str]  # SPECIAL_TOKEN_NAMES present -> token text
    chat_template: str | None = None


def _token_text(value: Any, *, field: str, path: Path) -> str | None:
    """A special token as written by transformers: a string, or an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise InputError(f"{path}: {field} must be a string or {{\"content\": ...}}, not {value!r}; fix the file")


def _chat_template(value: Any, path: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (transformers
    picks "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise InputError(f"{path}: chat_template lists templates {sorted(map(str, named))} but none named "
                         "'default'; name one 'default'")
    raise InputError(f"{path}: chat_template must be a string or a list of {{name, template}}; fix the file")


def read_tokenizer_settings(files: TextFiles) -> TokenizerSettings:
    """Special tokens and chat template, with transformers' precedence: a
    chat_template.jinja file wins over the config's entry, tokenizer_config.json over
    special_tokens_map.json."""
    special: dict[str, str] = {}
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        if name not in files:
            continue
        d = _json_object(files[name])
        for token in SPECIAL_TOKEN_NAMES:
            if (text := _token_text(d.get(token), field=token, path=files[name])) is not None:
                special[token] = text
        cfg = d if name == "tokenizer_config.json" else cfg
    template = _chat_template(cfg.get("chat_template"), files.get("tokenizer_config.json", Path()))
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"].read_text(encoding="utf-8")
    return TokenizerSettings(special_tokens=special, chat_template=template)


def read_generation_eos_ids(files: TextFiles) -> tuple[int, ...]:
    """generation_config.json's `eos_token_id` (an int or a list of ints); () when absent."""
    if "generation_config.json" not in files:
        return ()
    path = files["generation_config.json"]
    value = _json_object(path).get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InputError(f"{path}: eos_token_id must be a token id or a list of token ids, not {value!r}; fix the file")
    return tuple(ids)


def _json_object(path: Path) -> dict[str, Any]:
    d = load_json(path)
    if not isinstance(d, dict):
        raise InputError(f"{path} must hold a JSON object; restore it from the original checkpoint")
    return d
