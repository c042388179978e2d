"""Validated messages → text rendered by the tokenizer's own chat template (``Renderer``).

The chat template is the only source of the prompt format: we never retype it. We render with the
template compiled once (transformers' own Jinja environment, the same keyword arguments as
``apply_chat_template``) and check at start-up that this gives the very string ``apply_chat_template``
gives; if it ever does not, every record goes through ``apply_chat_template`` itself.

Reading and validating the record is the conversation contract's (``qwen_sft.conversation``); splitting the
rendered text into turns is ``turns.py``, matching turns to messages ``align.py``.
"""

from __future__ import annotations

from typing import Any

from qwen_sft.tokenize.turns import IM_END, IM_START


def _plain_probes() -> list[list[dict]]:
    """Tool-free conversations covering what a template could treat specially (system, emptiness, spaces)."""
    u, a, s = ({"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "Hello."), ("system", "Be brief.")))
    odd = [{"role": "user", "content": " \n lead and trail \n\n"}, {"role": "assistant", "content": "\n\n  x = 1  \n"}]
    return [[u, a], [s, u, a], [{"role": "system", "content": ""}, u, a], [u, a, u, a], [u], [s, u], [u, a, s, u, a],
            [a, u], odd, [s, *odd], [{"role": "user", "content": "안녕 你好 🤖"}, {"role": "assistant", "content": ""}]]


class Renderer:
    """The tokenizer's chat template, rendering exactly like ``apply_chat_template``, as fast as verified.

    Three ways, each used only where it was shown to give ``apply_chat_template``'s very string:
    ``plain`` — records without tools, tool calls or tool messages as ``<|im_start|>role\ncontent<|im_end|>\n``
    per message, allowed only when the template renders every plain probe exactly so (no default system
    prompt, no trimming); ``compiled`` — the template compiled once (the sandboxed Jinja environment and
    keyword arguments of transformers); ``reference`` — ``apply_chat_template`` itself.
    """

    def __init__(self, tok: Any) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tok = tok
        if not tok.chat_template:
            raise ValueError("the tokenizer has no chat template; point -m at a Qwen3-Coder tokenizer directory")
        self._template = _compile_jinja_template(tok.get_chat_template())
        self._kwargs = dict(tok.special_tokens_map)
        self.fast = True  # compiled template instead of apply_chat_template
        self.plain = True  # plain concatenation for tool-free records
        self.plain = all(self._same(m, None) for m in _plain_probes())

    @property
    def name(self) -> str:
        return ("plain+" if self.plain else "") + ("compiled" if self.fast else "apply_chat_template")

    def reference(self, messages: list[dict], tools: list[dict] | None) -> str:
        return self.tok.apply_chat_template(messages, tools=tools, tokenize=False)

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        if self.plain and not tools and all(m["role"] != "tool" and "tool_calls" not in m for m in messages):
            return "".join([f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages])
        if not self.fast:
            return self.reference(messages, tools)
        return self._template.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=False, **self._kwargs
        )

    def _same(self, messages: list[dict], tools: list[dict] | None) -> bool:
        """Same string as apply_chat_template, or both raise (a record the template itself rejects)."""
        try:
            expected = self.reference(messages, tools)
        except Exception:  # noqa: BLE001 - jinja raises anything
            expected = None
        try:
            return self.render(messages, tools) == expected
        except Exception:  # noqa: BLE001
            return expected is None

    def verify(self, conversations: list[tuple[list[dict], list[dict] | None]]) -> bool:
        """Check the fast ways against ``apply_chat_template`` on real records; drop each that differs."""
        for messages, tools in conversations:
            if not self._same(messages, tools):
                self.plain = False
                if not self._same(messages, tools):
                    self.fast = False
                    break
        return self.fast


