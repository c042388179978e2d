"""ChatML record → validated messages → text rendered by the tokenizer's own chat template → turns.

The chat template is the only source of the prompt format: we never retype it. We render with the
template compiled once (transformers' Jinja environment, qwen_sft/chat_template.py, the same keyword arguments
as ``apply_chat_template``) and check at start-up that this gives the very string ``apply_chat_template``
gives; if it ever does not, every record goes through ``apply_chat_template`` itself.

Turns are found in the rendered text, not derived from message contents, because the template
rewrites content (the official one trims assistant content before tool calls and groups consecutive
tool messages into one user turn).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant", "tool")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IM_START_B, IM_END_B = IM_START.encode(), IM_END.encode()


class RecordError(ValueError):
    """A record that cannot be tokenized; ``reason`` is a short stable key counted in the statistics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict):
        raise RecordError("bad_tool_call", f"{where} is {type(call).__name__}, expected an object")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RecordError("bad_tool_call", f"{where} has no function name")
    args = fn.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):
        # Hand-written ChatML often keeps OpenAI's JSON-string arguments; the template needs a mapping.
        try:
            args = json.loads(args, parse_constant=_no_constant) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise RecordError("bad_tool_arguments", f"{where}.arguments is not JSON ({err.msg})") from None
        except RecursionError:
            raise RecordError("bad_tool_arguments", f"{where}.arguments are nested too deeply to parse") from None
    if not isinstance(args, dict):
        raise RecordError("bad_tool_arguments", f"{where}.arguments is {type(args).__name__}, expected an object")
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def _no_constant(name: str) -> Any:
    # NaN/Infinity are not JSON: convert rejects them, so tokenize does too (same decision on the same record)
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def normalize_record(record: Any, special_tokens: tuple[str, ...]) -> tuple[list[dict], list[dict] | None]:
    """Validate one ChatML record; return (messages, tools) exactly as they are handed to the template.

    Only the keys the template reads are kept (role, content, tool_calls, tool_call_id), so extra keys
    of the source never leak into the prompt. ``loss`` flags are read separately by ``loss_flags``.
    """
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"record is {type(record).__name__}, expected an object")
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RecordError("no_messages", "record has no non-empty 'messages' list")
    messages = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RecordError("bad_message", f"{where} is {type(msg).__name__}, expected an object")
        role = msg.get("role")
        if role not in ROLES:
            raise RecordError("bad_role", f"{where}.role={role!r}, expected one of {', '.join(ROLES)}")
        content = msg.get("content")
        if content is None and role != "tool" and not (role == "assistant" and msg.get("tool_calls")):
            # convert's rule (validate.py): null is "" and only a tool result or a pure tool call may be empty
            reason = "empty_assistant" if role == "assistant" else "empty_content"
            raise RecordError(reason, f"{where} ({role}) has content null")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise RecordError("bad_content", f"{where}.content is {type(content).__name__}, expected a string")
        out: dict[str, Any] = {"role": role, "content": content}
        calls = msg.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise RecordError("bad_tool_call", f"{where}.tool_calls must be a list on an assistant message")
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        if role == "tool" and isinstance(msg.get("tool_call_id"), str):
            out["tool_call_id"] = msg["tool_call_id"]
        loss = msg.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise RecordError("bad_loss_flag", f"{where}.loss={loss!r}, expected true or false")
        messages.append(out)
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as err:
            raise RecordError("bad_tools", f"'tools' is a string that is not JSON ({err.msg})") from None
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RecordError("bad_tools", "'tools' must be a list of objects")
    tools = tools or None
    # A literal "<|im_end|>" in user text would become the control token: it would end the turn early
    # for the model and break the turn layout the labels rely on. Such records are rejected, not escaped,
    # so every written sample still equals the template rendered and tokenized in one pass.
    texts = [m["content"] for m in messages]
    if tools or any("tool_calls" in m for m in messages):
        texts.append(json.dumps([[m.get("tool_calls") for m in messages], tools], ensure_ascii=False))
    prefixes = {token[:2] for token in special_tokens}  # "<|" for Qwen: a cheap filter before the exact scan
    for text in texts:
        if any(p in text for p in prefixes):
            for token in special_tokens:
                if token in text:
                    raise RecordError("special_token_in_content", f"the text contains the control token {token!r}")
    return messages, tools


def loss_flags(record: dict) -> list[bool | None]:
    """The per-message ``loss`` override of each message (None where the policy decides)."""
    return [m.get("loss") for m in record["messages"]]


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
        from qwen_sft.chat_template import compile_template

        self.tok = tok
        if not tok.chat_template:
            raise ValueError("the tokenizer has no chat template; point -m at a Qwen3-Coder tokenizer directory")
        self._template = compile_template(tok.get_chat_template())
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


class Turn(NamedTuple):
    """One ``<|im_start|>role\\n…<|im_end|>\\n`` block as byte offsets into the rendered UTF-8 text."""

    role: str
    start: int  # at <|im_start|>
    body: int  # first byte after "<|im_start|>role\n" (the header)
    end: int  # first byte after <|im_end|>


def parse_turns(data: bytes) -> list[Turn]:
    """Split rendered text into turns; raise RecordError if the text is not a clean sequence of turns."""
    turns: list[Turn] = []
    pos = 0
    n = len(data)
    while pos < n:
        if not data.startswith(IM_START_B, pos):
            raise RecordError("template_layout", f"rendered text has stray text at byte {pos}")
        head = pos + len(IM_START_B)
        close = data.find(IM_END_B, head)
        if close < 0:
            raise RecordError("template_layout", "a turn has no <|im_end|>")
        nl = data.find(b"\n", head, close)
        role_end = nl if nl >= 0 else close
        role = data[head:role_end].decode()
        body = role_end + 1 if nl >= 0 else role_end
        end = close + len(IM_END_B)
        turns.append(Turn(role, pos, body, end))
        pos = end + 1 if data.startswith(b"\n", end) else end
    return turns


def align_turns(turns: list[Turn], messages: list[dict]) -> list[list[int]]:
    """For each turn, the indices of the messages it renders ([] for a system block the template adds).

    Consecutive tool messages share one user turn, as the template groups them.
    """
    groups: list[tuple[str, list[int]]] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool" and groups and groups[-1][0] == "tool":
            groups[-1][1].append(i)
        else:
            groups.append((m["role"], [i]))
    owners: list[list[int]] = []
    if turns and turns[0].role == "system" and messages[0]["role"] != "system":
        owners.append([])  # the template's own system block (tools listing)
    if len(turns) - len(owners) != len(groups):
        raise RecordError("template_layout", f"the template rendered {len(turns)} turns for {len(groups)} message groups")
    for turn, (role, idx) in zip(turns[len(owners) :], groups):
        if turn.role != ("user" if role == "tool" else role):
            raise RecordError("template_layout", f"turn role {turn.role!r} where message role {role!r} was expected")
        owners.append(idx)
    return owners
