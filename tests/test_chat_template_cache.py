"""The compiled chat template's code cache: reused, keyed by the template, never read stale.

    python -m pytest -q tests/test_chat_template_cache.py
"""

from __future__ import annotations

import marshal

import pytest

from qwen_sft import chat_template as ct
from qwen_sft.tokenizer import TEMPLATE_PATH

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕 hi"},
            {"role": "assistant", "content": "hello", "tool_calls": [
                {"type": "function", "function": {"name": "run", "arguments": {"cmd": "ls"}}}]},
            {"role": "tool", "content": "ok"}]
TOOLS = [{"type": "function", "function": {"name": "run", "description": "run a command",
                                           "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_SFT_CACHE", str(tmp_path))
    ct.compile_template.cache_clear()
    yield tmp_path / "jinja"
    ct.compile_template.cache_clear()


def rendered(template: str) -> str:
    ct.compile_template.cache_clear()  # a fresh process's view: only the file cache remains
    return ct.render(ct.compile_template(template), MESSAGES, tools=TOOLS, eos_token="<|im_end|>")


def test_the_code_is_cached_reused_and_renders_the_same(cache, monkeypatch):
    official = TEMPLATE_PATH.read_text(encoding="utf-8")
    first = rendered(official)
    files = list(cache.iterdir())
    assert len(files) == 1 and "<tool_call>\n<function=run>" in first

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the code")

    with monkeypatch.context() as m:
        m.setattr(ct.ImmutableSandboxedEnvironment, "compile", no_compile)
        assert rendered(official) == first
    other = official.replace("<|im_start|>", "<|im_start|> ")  # another template: another entry, its own text
    assert rendered(other) != first and len(list(cache.iterdir())) == 2


def test_a_damaged_or_unwritable_cache_only_means_compiling_again(cache, tmp_path, monkeypatch):
    official = TEMPLATE_PATH.read_text(encoding="utf-8")
    first = rendered(official)
    (entry,) = cache.iterdir()
    entry.write_bytes(b"\x00garbage")
    assert rendered(official) == first and entry.read_bytes() != b"\x00garbage"  # rewritten whole
    entry.write_bytes(marshal.dumps(12))  # well-formed, but no code
    assert rendered(official) == first
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("QWEN_SFT_CACHE", str(blocked))
    assert rendered(official) == first


def test_the_key_changes_with_the_environment_source(cache, monkeypatch, tmp_path):
    official = TEMPLATE_PATH.read_text(encoding="utf-8")
    before = ct._code_cache_path(official)
    edited = tmp_path / "chat_template.py"
    edited.write_bytes(open(ct.__file__, "rb").read() + b"\n# an edited environment\n")
    monkeypatch.setattr(ct, "__file__", str(edited))
    assert ct._code_cache_path(official) != before
