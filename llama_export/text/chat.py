"""Chat templates rendered as transformers' `apply_chat_template` renders them.

Same environment as transformers (`utils/chat_template_utils.py`): a jinja2 ImmutableSandboxedEnvironment
with trim_blocks and lstrip_blocks, the loopcontrols extension, a `{% generation %}` block (rendered as
its body), a `tojson` filter that does not escape HTML, and the globals `raise_exception`,
`strftime_now`, `dict` and `namespace` (no underscore names). The template sees `messages`, `tools`
(None), `documents` (None), `add_generation_prompt` and the named special tokens (`bos_token`, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from llama_export.errors import InputError
from llama_export.text.base import Message


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
        rendering keeps the body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore names (no reach into Python internals)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class DictFactory:
        """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = DictFactory()
    env.globals["namespace"] = Namespace
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    return _environment().from_string(template)


def render_chat_template(template: str, messages: Sequence[Message], *, special_tokens: Mapping[str, str],
                         source: str) -> str:
    """The prompt text of `messages`, ending with the assistant's turn opening (add_generation_prompt)."""
    import jinja2

    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages], tools=None, documents=None, add_generation_prompt=True,
            **special_tokens,
        )
    except jinja2.TemplateError as e:
        kind = "has a syntax error" if isinstance(e, jinja2.TemplateSyntaxError) else "failed to render"
        raise InputError(f"the chat template of {source} {kind}: {e}; fix the template or use --prompt") from None
