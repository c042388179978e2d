"""Exact ids and exact supervised ids, with the offline tokenizer + our template and the released one.

    python -m pytest -q tests/test_tokenize_labels.py

Every case also checks the contract: ``input_ids == tok(tok.apply_chat_template(messages, tools=tools,
tokenize=False), add_special_tokens=False).input_ids``, with the fast (tiktoken) and the HF encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_sft.conversation import RecordError, normalize_record
from qwen_sft.tokenize.sample import Overlong, SampleTokenizer

IM_START, IM_END, NL = 151644, 151645, 198
CALL, END_CALL = 151657, 151658
TOKENIZERS = ["offline_tok", "spec_tok"]

_CACHE: dict[tuple[int, str], SampleTokenizer] = {}


@pytest.fixture(params=TOKENIZERS)
def tok(request):
    return request.getfixturevalue(request.param)


def tokenizer_for(tok, engine: str = "auto", **kw) -> SampleTokenizer:
    key = (id(tok), engine)
    if key not in _CACHE:
        _CACHE[key] = SampleTokenizer(tok, engine=engine)
    st = _CACHE[key]
    st.max_len, st.policy, st.overlength = kw.get("max_len", 2048), kw.get("policy", "assistant"), kw.get("overlength", "drop")
    return st


def reference_ids(tok, record: dict) -> list[int]:
    messages, tools = normalize_record(record, ())
    return tok(tok.apply_chat_template(messages, tools=tools, tokenize=False), add_special_tokens=False).input_ids


def runs(sample) -> list[list[int]]:
    """Maximal runs of supervised label ids."""
    out, cur = [], []
    for lab in sample.label.tolist():
        if lab == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(lab)
    return out + ([cur] if cur else [])


def check(tok, record: dict, **kw):
    """Tokenize with both engines; assert the contract and identical results; return the sample."""
    fast = tokenizer_for(tok, **kw).tokenize(record)
    slow = tokenizer_for(tok, "hf", **kw).tokenize(record)
    assert tokenizer_for(tok).encoder.name == "tiktoken"  # the fast path is really exercised
    assert fast.input_ids.tolist() == slow.input_ids.tolist() and fast.label.tolist() == slow.label.tolist()
    if fast.cut == "":
        assert fast.input_ids.tolist() == reference_ids(tok, record)
    lab, ids = fast.label.tolist(), fast.input_ids.tolist()
    assert all(x in (-100, i) for x, i in zip(lab, ids))
    return fast


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def msg(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


def call(name: str, args) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string", "description": "file path"}}, "required": ["path"]}}}]


def test_without_system_exact_ids(tok):
    s = check(tok, {"messages": [msg("user", "hi"), msg("assistant", "hello")]})
    assert s.input_ids.tolist() == [IM_START, 872, NL, 6023, IM_END, NL, IM_START, 77091, NL, 14990, IM_END, NL]
    assert s.label.tolist() == [-100] * 9 + [14990, IM_END, -100]


def test_with_system_and_empty_system(tok):
    s = check(tok, {"messages": [msg("system", "You are terse."), msg("user", "hi"), msg("assistant", "hello")]})
    assert s.input_ids.tolist()[:3] == [IM_START, 8948, NL] and runs(s) == [[14990, IM_END]]
    s = check(tok, {"messages": [msg("system", ""), msg("user", "hi"), msg("assistant", "hello")]})
    assert s.input_ids.tolist()[:5] == [IM_START, 8948, NL, IM_END, NL] and runs(s) == [[14990, IM_END]]


def test_first_user_turn_kept_without_system(tok):
    s = check(tok, {"messages": [msg("user", "first"), msg("assistant", "a"), msg("user", "second"), msg("assistant", "b")]})
    assert s.input_ids.tolist()[:4] == [IM_START, 872, NL, *enc(tok, "first")]


def test_multi_turn_and_last_policy(tok):
    rec = {"messages": [msg("user", "Q1"), msg("assistant", "A one"), msg("user", "Q2"), msg("assistant", "A two")]}
    assert runs(check(tok, rec)) == [enc(tok, "A one") + [IM_END], enc(tok, "A two") + [IM_END]]
    assert runs(check(tok, rec, policy="last")) == [enc(tok, "A two") + [IM_END]]
    s = check(tok, rec, policy="all")
    assert s.label.tolist() == s.input_ids.tolist()


def test_per_message_loss_flags(tok):
    rec = {"messages": [msg("user", "Q1", loss=True), msg("assistant", "A one", loss=False), msg("user", "Q2"),
                        msg("assistant", "A two")]}
    assert runs(check(tok, rec)) == [enc(tok, "Q1") + [IM_END], enc(tok, "A two") + [IM_END]]
    rec["messages"][1]["loss"] = True
    assert runs(check(tok, rec, policy="last")) == [enc(tok, "Q1") + [IM_END], enc(tok, "A one") + [IM_END],
                                                    enc(tok, "A two") + [IM_END]]
    rec["messages"][3]["loss"] = False
    rec["messages"][0]["loss"] = False
    assert runs(check(tok, rec, policy="last")) == [enc(tok, "A one") + [IM_END]]
    rec["messages"][1]["loss"] = False
    with pytest.raises(RecordError, match="no_supervised_tokens"):
        check(tok, rec)


CALL_XML = "<tool_call>\n<function=read_file>\n<parameter=path>\na.py\n</parameter>\n</function>\n</tool_call>"


@pytest.mark.parametrize("args", [{"path": "a.py"}, '{"path": "a.py"}'], ids=["object", "json-string"])
def test_tool_call_arguments(tok, args):
    rec = {"tools": TOOLS, "messages": [
        msg("user", "Show a.py"), msg("assistant", "  Let me look. \n", tool_calls=[call("read_file", args)]),
        msg("tool", "print(1)\r\n"), msg("assistant", "It prints 1.")]}
    s = check(tok, rec)
    # Both templates trim content before tool calls; the header "\n" stays unsupervised.
    assert runs(s) == [enc(tok, "Let me look.\n\n" + CALL_XML) + [IM_END], enc(tok, "It prints 1.") + [IM_END]]
    assert s.input_ids.tolist()[:3] == [IM_START, 8948, NL]  # the template's own system block lists the tools


def test_parallel_calls_and_ending_on_a_call(tok):
    rec = {"messages": [msg("user", "Two files"), msg("assistant", "", tool_calls=[
        call("read_file", {"path": "a.py"}), call("read_file", {"path": "b.py", "lines": 3})])]}
    s = check(tok, rec)
    second = "<tool_call>\n<function=read_file>\n<parameter=path>\nb.py\n</parameter>\n<parameter=lines>\n3\n</parameter>\n</function>\n</tool_call>"
    assert runs(s) == [enc(tok, CALL_XML + "\n" + second) + [IM_END]]
    assert s.input_ids.tolist()[-3:] == [END_CALL, IM_END, NL]


def test_consecutive_tool_responses_group_into_one_user_turn(tok):
    rec = {"messages": [msg("user", "go"), msg("assistant", "", tool_calls=[call("read_file", {"path": "a"}),
                                                                            call("read_file", {"path": "b"})]),
                        msg("tool", "A"), msg("tool", "B"), msg("assistant", "done")]}
    s = check(tok, rec)
    ids = s.input_ids.tolist()
    assert ids.count(IM_START) == 4  # user, assistant, one grouped user turn, assistant
    assert ids.count(151665) == 2 and runs(s)[-1] == enc(tok, "done") + [IM_END]
    rec["messages"][3]["loss"] = True  # a flag on one grouped tool message supervises the grouped turn
    grouped = enc(tok, "<tool_response>\nA\n</tool_response>\n<tool_response>\nB\n</tool_response>\n") + [IM_END]
    assert runs(check(tok, rec))[1] == grouped


def test_content_with_leading_and_trailing_whitespace(tok):
    s = check(tok, {"messages": [msg("user", "  x \n"), msg("assistant", "\n\n  code  \n")]})
    ids = s.input_ids.tolist()
    # "\n" (header) + "\n\n" (content) merge into one token that starts in the header: not supervised.
    merged = enc(tok, "\n\n\n  code  \n")
    assert ids[ids.index(77091) + 1 : -2] == merged and merged[0] == 1406
    assert runs(s) == [merged[1:] + [IM_END]]
    s = check(tok, {"messages": [msg("user", "hi"), msg("assistant", "hello  ")]})
    assert runs(s) == [[14990, 256, IM_END]]


def test_korean_chinese_emoji_and_nfc(tok):
    text = "안녕하세요! 你好，世界 🤖🧑‍💻 café"
    s = check(tok, {"messages": [msg("user", text), msg("assistant", text)]})
    assert runs(s) == [enc(tok, text) + [IM_END]]
    decomposed = "cafe\u0301"  # the NFC normalizer composes it; the ids equal the released tokenizer's
    s = check(tok, {"messages": [msg("user", decomposed), msg("assistant", decomposed)]})
    assert runs(s) == [enc(tok, "caf\u00e9") + [IM_END]]


@pytest.mark.parametrize("literal", ["<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>"])
def test_literal_control_tokens_are_rejected(tok, literal):
    with pytest.raises(RecordError, match="special_token_in_content"):
        check(tok, {"messages": [msg("user", f"say {literal} please"), msg("assistant", "no")]})


def test_literal_tool_call_tag_in_user_text_keeps_the_contract(tok):
    s = check(tok, {"messages": [msg("user", "what is <tool_call>?"), msg("assistant", "a tag")]})
    assert CALL in s.input_ids.tolist() and runs(s) == [enc(tok, "a tag") + [IM_END]]


def test_truncation_keeps_whole_turns(tok):
    rec = {"messages": [msg("user", "Q1"), msg("assistant", "A one"), msg("user", "Q2 " * 30), msg("assistant", "A two")]}
    full = reference_ids(tok, rec)
    with pytest.raises(Overlong) as err:
        check(tok, rec, max_len=30)
    assert err.value.length == len(full)
    s = check(tok, rec, max_len=30, overlength="truncate")
    boundary = full.index(IM_END, full.index(77091)) + 2  # after the first assistant turn's "<|im_end|>\n"
    assert s.cut == "turn" and s.input_ids.tolist() == full[:boundary] and full[boundary - 2 : boundary] == [IM_END, NL]
    assert runs(s) == [enc(tok, "A one") + [IM_END]]


def test_truncation_inside_a_turn_and_before_a_half_call(tok):
    rec = {"messages": [msg("user", "go"), msg("assistant", "word " * 40)]}
    s = check(tok, rec, max_len=20, overlength="truncate")
    assert s.cut == "mid_turn" and s.input_ids.tolist() == reference_ids(tok, rec)[:20] and len(runs(s)[0]) == 11
    rec = {"messages": [msg("user", "go"), msg("assistant", "Reading now.", tool_calls=[call("read_file", {"path": "x" * 200})])]}
    s = check(tok, rec, max_len=20, overlength="truncate")
    ids = s.input_ids.tolist()
    assert s.cut == "mid_turn" and CALL not in ids and ids == reference_ids(tok, rec)[: len(ids)]
    assert runs(s) == [enc(tok, "Reading now.\n\n")]


def test_bad_records_have_reasons(tok):
    st = tokenizer_for(tok)
    cases = [
        ("no_messages", {"messages": []}),
        ("unknown_role", {"messages": [msg("bot", "x")]}),
        ("wrong_type", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}),
        ("arguments_not_object", {"messages": [msg("user", "x"), msg("assistant", "", tool_calls=[call("f", "print(1)")])]}),
        ("wrong_type", {"messages": [msg("user", "x"), msg("assistant", "y", loss="yes")]}),
        ("not_an_object", ["messages"]),
    ]
    for reason, rec in cases:
        with pytest.raises(RecordError) as err:
            st.tokenize(rec)
        assert err.value.reason == reason, (reason, err.value)


def _lost(st: SampleTokenizer, content: str) -> str:
    """The content characters before the first supervised token of a one-turn answer."""
    import numpy as np

    from qwen_sft.tokenize.labels import token_starts
    from qwen_sft.tokenize.turns import parse_turns

    record = {"messages": [msg("user", "q"), msg("assistant", content)]}
    sample = st.tokenize(record)
    data = st.render(record)[0].encode()
    starts = token_starts(sample.input_ids, st.encoder.byte_len)
    return data[parse_turns(data)[-1].body : starts[int(np.flatnonzero(sample.label != -100)[0])]].decode()


def test_exactly_the_documented_first_characters_are_unsupervised(offline_tok):
    """A first line of spaces (or tabs, or newlines) merges with the header's "\\n": docs/tokenize.md lists
    every such prefix, and which one a content loses is the first token of tok("\\n" + content)."""
    import itertools
    import re

    from qwen_sft.tokenize.labels import header_merges

    merges = header_merges(offline_tok)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "tokenize.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- header-merges -->\n```\n(.*?)\n```", doc, re.S)
    assert block and json.loads("[" + block.group(1) + "]") == merges
    assert merges[:4] == ["\n", "\t\n", "\n\n", " \n"] and len(merges) == 33
    st = tokenizer_for(offline_tok)
    assert _lost(st, "   \n    x = 1\n") == "   \n" and _lost(st, "\n\nx") == "\n\n" and _lost(st, "  x") == ""
    seen = set()
    for n in range(1, 5):
        for prefix in itertools.product(" \t\n\r", repeat=n):
            for tail in ("x", " x", "\tx"):
                content = "".join(prefix) + tail
                first = offline_tok.convert_tokens_to_string(offline_tok.tokenize("\n" + content)[:1])
                lost = _lost(st, content)
                assert lost == first[1:], content
                assert lost == "" or lost in merges
                seen.add(lost)
    assert len(seen) > 10
