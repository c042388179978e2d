"""Chat templates rendered exactly as transformers renders them, with jinja2 alone (no transformers import).

    from qwen_sft.chat_template import compile_template, render
    text = render(compile_template(template), messages, tools=tools, eos_token="<|im_end|>")

The environment is the one ``transformers.utils.chat_template_utils._compile_jinja_template`` builds (5.x):
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the loop-controls extension and a
``{% generation %}`` block tag, ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, a
constructor-only ``dict`` and a ``namespace`` that refuses underscore names. ``render`` prepares the inputs as
``apply_chat_template`` does (keys whose value is None dropped, reasoning aliases, plain JSON data only).
Why our own copy: importing transformers imports torch (seconds) and the data path needs neither.
``tests/test_light_tokenizer.py`` checks the rendered text against ``apply_chat_template`` on many conversations.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from importlib.util import MAGIC_NUMBER
from pathlib import Path
from types import CodeType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' names, the first one standard


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` renders its body unchanged (the assistant-mask tracking of
    transformers is not used: labels come from the rendered turns, see tokenize/labels.py)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` only: no attribute access to the real type from a template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed attributes (no reach into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick (namespace(self=…))
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled once in transformers' sandboxed environment (``env.from_string``, its code cached)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.template_class.from_code(env, _compiled_code(env, template), env.make_globals(None), None)


def _code_cache_path(template: str) -> Path:
    """One file per (template text, this module's source, jinja2 version, Python bytecode version): any change to
    the template or to the environment built above gives another file, so a stale entry is never read."""
    from qwen_sft.tokenizer import project_cache_dir

    key = hashlib.sha256()
    for part in (template.encode(), Path(__file__).read_bytes(), jinja2.__version__.encode(), MAGIC_NUMBER):
        key.update(hashlib.sha256(part).digest())
    return project_cache_dir() / "jinja" / f"{key.hexdigest()}.code"


def _compiled_code(env: jinja2.Environment, template: str) -> Any:
    """``env.compile(template)``, kept in the project cache: compiling the official template costs ~0.12–0.19 s of
    a 5-record run's start-up, loading its code ~1 ms. Not jinja2's FileSystemBytecodeCache: its files start with
    a pickle, and we unpickle nothing. The file is marshalled code, as trusted as ``__pycache__``; a cache that
    cannot be read or written only means compiling again."""
    path = _code_cache_path(template)
    try:
        code = marshal.loads(path.read_bytes())
        if isinstance(code, CodeType):
            return code
    except (OSError, EOFError, ValueError, TypeError):
        pass
    code = env.compile(template)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(marshal.dumps(code))
        os.replace(tmp, path)  # whole or absent: a reader never sees half a file
    except OSError:
        pass
    return code


def plain_data(value: Any) -> Any:
    """Only plain JSON types reach a template (transformers' ``_plain_template_data``): anything else becomes
    a placeholder naming its type, so no object with side-effecting methods is ever handed to the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    return f"<{type(value).__name__}>"


def prepare_messages(messages: list[dict]) -> list[dict]:
    """``apply_chat_template``'s input steps: keys whose value is None dropped, reasoning under every alias."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
        message = plain_data({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(template: jinja2.Template, messages: list[dict], tools: list[dict] | None = None,
           documents: list[dict] | None = None, add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """What ``apply_chat_template(messages, tools=tools, tokenize=False, …)`` returns for one conversation;
    ``kwargs`` are the tokenizer's special tokens map plus any extra template variables."""
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("Tools should be JSON schemas (dicts); callables need transformers' get_json_schema.")
    return template.render(messages=prepare_messages(messages), tools=plain_data(tools),
                           documents=plain_data(documents), add_generation_prompt=add_generation_prompt,
                           **plain_data(kwargs))
