"""Typed parsing of every JSON file the tool reads, with one-line errors.

A file's schema is a pydantic model or a (pydantic-annotated) dataclass; `parse_json_file` reads the
file, parses it strictly (no int from a float or a bool, no string for a number, no NaN where a finite
number is needed) and turns the first problem into one `ConfigError` (or the caller's error class)
naming the file, the field, the value and the fix:

    /ckpt/config.json: num_hidden_layers=2.5 should be a valid integer; fix the file (...)

`check_fields(obj)` applies the same per-field constraints to a dataclass built in code, so a
constraint written once in an `Annotated[...]` type holds for files and for code alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from llama_export.errors import ConfigError, LlamaExportError

T = TypeVar("T")
_MAX_VALUE_CHARS = 60


def read_bytes(path: Path, *, error: type[LlamaExportError] = ConfigError) -> bytes:
    """The file's bytes; any OSError (missing, a directory, unreadable) becomes one `error` line."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None


@functools.lru_cache(maxsize=None)
def _adapter(schema: Any) -> TypeAdapter:
    return TypeAdapter(schema)


def parse_json(raw: bytes | str, schema: type[T], *, source: str, fix: str,
               error: type[LlamaExportError] = ConfigError) -> T:
    """`raw` JSON parsed strictly into `schema`; `source` (a file name) and `fix` go into the error."""
    try:
        return _adapter(schema).validate_json(raw, strict=True)
    except ValidationError as e:
        raise error(describe(e, source=source, fix=fix, schema=schema)) from None


def parse_json_file(path: Path, schema: type[T], *, fix: str, error: type[LlamaExportError] = ConfigError) -> T:
    """`parse_json` of the file at `path` (read errors included)."""
    return parse_json(read_bytes(path, error=error), schema, source=str(path), fix=fix, error=error)


def parse_value(value: Any, schema: type[T], *, source: str, fix: str,
                error: type[LlamaExportError] = ConfigError) -> T:
    """A value decoded from JSON elsewhere (a dict, say), held to exactly the rules of a file: it is
    encoded again and parsed by `parse_json`."""
    try:
        raw = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise error(f"{source}: not JSON data ({e}); {fix}") from None
    return parse_json(raw, schema, source=source, fix=fix, error=error)


def describe(e: ValidationError, *, source: str, fix: str, schema: Any = None) -> str:
    """One line for the first error of `e` (the count of the others is appended)."""
    errors = e.errors(include_url=False)
    err = errors[0]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    loc = _location(err["loc"])
    msg = str(err["msg"])
    kind = err["type"]
    if kind == "json_invalid":
        return f"{source} is not valid JSON ({msg.removeprefix('Invalid JSON: ')}){more}; {fix}"
    if kind == "missing":
        return f"{source} lacks the required field {loc!r}{more}; {fix}"
    if kind == "extra_forbidden":
        return f"{source}: unknown field {loc!r}{more}; {fix}"
    if kind.startswith("value_error") or kind == "assertion_error":
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        where = f"{loc}={_value(err.get('input'))} " if loc else ""
        return f"{source}: {where}{msg}{more}; {fix}"
    note = _description(schema, err["loc"])
    if not loc:
        return f"{source}: the top level {_should(msg)}{more}; {fix}"
    return f"{source}: {loc}={_value(err.get('input'))} {_should(msg)}{note}{more}; {fix}"


def _should(msg: str) -> str:
    """pydantic's 'Input should be ...' / 'String should match ...' as 'should ...'."""
    if not msg:
        return "is invalid"
    return re.sub(r"^(Input|String|Value|Dictionary|List|Tuple|Object)\s+(?=should\b)", "", msg)


def _description(schema: Any, loc: tuple) -> str:
    """' (why)' from the schema's field description, for a top-level field of a pydantic model."""
    fields = getattr(schema, "model_fields", None)
    if not fields or len(loc) != 1 or loc[0] not in fields or not fields[loc[0]].description:
        return ""
    return f" ({fields[loc[0]].description})"


def _location(loc: tuple) -> str:
    """'ranks[0].segments[2].file' from pydantic's location tuple (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            continue  # "function-after[...]", "int", "str": which union member was tried
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "tuple", "none", "null"}


def _value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


@functools.lru_cache(maxsize=None)
def _field_adapters(cls: type) -> tuple[tuple[str, TypeAdapter], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, TypeAdapter(hints[f.name])) for f in dataclasses.fields(cls))


def check_fields(obj: Any) -> None:
    """Check each field of dataclass instance `obj` against its annotated type and constraints
    (strict: no int for a float field's bool, no float for an int); raise ConfigError naming the
    field and value."""
    for name, adapter in _field_adapters(type(obj)):
        value = getattr(obj, name)
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as e:
            msg = e.errors(include_url=False)[0]["msg"]
            raise ConfigError(f"{name}={_value(value)} {_should(msg)}") from None
