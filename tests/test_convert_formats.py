"""ms-swift's shapes, records that are not SFT data, and the count of keys no shape read.

    python -m pytest -q tests/test_convert_formats.py
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from qwen_sft.conversation import RecordError, build_record
from qwen_sft.data.cli import main
from qwen_sft.data.convert import convert_inputs
from qwen_sft.data.options import ConvertOptions, FieldMap
from qwen_sft.data.shapes import to_messages


def convert(rec: dict, unread: list | None = None, **opts) -> dict:
    notes: Counter = Counter()
    options = ConvertOptions(**opts)
    args = () if unread is None else (unread,)
    messages, tools = to_messages(rec, notes, options, *args)
    return build_record(messages, tools, options.system, notes)


def rejected(rec: dict) -> RecordError:
    with pytest.raises(RecordError) as err:
        convert(rec)
    return err.value


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CALL_SEOUL = {"type": "function", "function": {"name": "aqi", "arguments": {"city": "Seoul"}}}
CALL_BUSAN = {"type": "function", "function": {"name": "aqi", "arguments": {"city": "Busan"}}}


def test_swift_query_response_with_history_and_system():
    rec = {"system": "S", "query": "Q3", "response": "A3", "history": [["Q1", "A1"], ["Q2", "A2"]]}
    assert convert(rec)["messages"] == [m("system", "S"), m("user", "Q1"), m("assistant", "A1"), m("user", "Q2"),
                                        m("assistant", "A2"), m("user", "Q3"), m("assistant", "A3")]


@pytest.mark.parametrize("history", [[], "[]", None])
def test_swift_query_response_with_empty_history(history):
    rec = {"query": "Q", "response": "A", "history": history}
    assert convert(rec)["messages"] == [m("user", "Q"), m("assistant", "A")]


def test_swift_history_as_json_string_and_bad_history():
    rec = {"query": "Q2", "response": "A2", "history": json.dumps([["Q1", "A1"]])}
    assert convert(rec)["messages"] == [m("user", "Q1"), m("assistant", "A1"), m("user", "Q2"), m("assistant", "A2")]
    bad = rejected({"query": "Q", "response": "A", "history": [["only one"]]})
    assert bad.reason == "wrong_type" and "history[0]" in bad.detail


def test_pairs_read_system_too():
    assert convert({"system": "S", "prompt": "Q", "completion": "A"})["messages"] == [
        m("system", "S"), m("user", "Q"), m("assistant", "A")]


def test_swift_agent_roles_tool_call_and_tool_response():
    tools = json.dumps([{"type": "function", "function": {"name": "aqi", "parameters": {"type": "object"}}}])
    rec = {"tools": tools, "messages": [
        m("user", "Air in Seoul and Busan?"),
        m("tool_call", '{"name": "aqi", "arguments": {"city": "Seoul"}}'),
        m("tool_call", '{"name": "aqi", "arguments": "{\\"city\\": \\"Busan\\"}"}'),
        m("tool_response", '{"aqi": 10}'), m("tool_response", '{"aqi": 72}'),
        m("assistant", "Seoul 10, Busan 72.")]}
    out = convert(rec)
    assert out["messages"] == [m("user", "Air in Seoul and Busan?"),
                               {"role": "assistant", "content": "", "tool_calls": [CALL_SEOUL, CALL_BUSAN]},
                               m("tool", '{"aqi": 10}'), m("tool", '{"aqi": 72}'), m("assistant", "Seoul 10, Busan 72.")]
    assert out["tools"][0]["function"]["name"] == "aqi"


def test_swift_tool_call_joins_the_assistant_text_before_it():
    rec = {"messages": [m("user", "Q"), m("assistant", "Let me check."),
                        m("tool_call", '{"name": "aqi", "arguments": {"city": "Seoul"}}'),
                        m("tool_response", "10"), m("assistant", "10.")]}
    assert convert(rec)["messages"][1] == {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL_SEOUL]}
    rec["messages"][2]["loss"] = False
    assert rejected(rec).reason == "mixed_loss_in_turn"
    rec["messages"][1]["loss"] = False
    assert convert(rec)["messages"][1]["loss"] is False
    bad = rejected({"messages": [m("user", "Q"), m("tool_call", "not json")]})
    assert bad.reason == "invalid_json_field" and "message 1 (tool_call)" in bad.detail


PAIR_MSGS = [m("user", "Q"), m("assistant", "good")]


@pytest.mark.parametrize(("rec", "reason", "named"), [
    ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference_data", "prompt + chosen + rejected"),
    ({"chosen": PAIR_MSGS, "rejected": [m("user", "Q"), m("assistant", "bad")]}, "preference_data", "chosen + rejected"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
      "rejected": {"from": "gpt", "value": "bad"}}, "preference_data", "DPO/ORPO"),
    ({"instruction": "Q", "input": "", "chosen": "good", "rejected": "bad"}, "preference_data", "DPO/ORPO"),
    ({"messages": PAIR_MSGS, "rejected_response": "bad"}, "preference_data", "rejected_response"),
    ({"messages": PAIR_MSGS, "kto_tag": False}, "kto_data", "kto_tag=False"),
    ({"prompt": "Q", "completion": "bad", "label": False}, "kto_data", "label=False"),
    ({"messages": PAIR_MSGS, "label": True}, "kto_data", "KTO"),
])
def test_preference_and_kto_rows_are_rejected_naming_the_format(rec, reason, named):
    err = rejected(rec)
    assert err.reason == reason and named in err.detail


def test_map_is_an_explicit_choice_of_the_chosen_side():
    rec = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    fmap = FieldMap.parse(["user=prompt", "assistant=chosen"])
    unread: list = []
    assert convert(rec, unread, field_map=fmap)["messages"] == [m("user", "Q"), m("assistant", "good")]
    assert unread == ["rejected"]


def test_unread_keys_per_record_key_and_per_message_key():
    rec = {"id": 3, "images": ["a.png"], "messages": [
        {"role": "user", "content": "Q", "name": "bob"},
        {"role": "assistant", "content": "A", "reasoning_content": "r", "metadata": {"masked": False, "src": "x"}},
        {"role": "user", "content": [{"type": "text", "text": "Q2", "cache_control": {}}]},
        {"role": "assistant", "content": "A2", "metadata": "free text"}]}
    unread: list = []
    convert(rec, unread)
    assert Counter(unread) == Counter({"id": 1, "images": 1, "messages[].name": 1, "messages[].reasoning_content": 1,
                              "messages[].metadata.src": 1, "messages[].content[].cache_control": 1,
                              "messages[].metadata": 1})


@pytest.mark.parametrize(("rec", "expected"), [
    ({"conversations": [{"from": "human", "value": "Q", "lang": "en"}, {"from": "gpt", "value": "A"}],
      "system": "S", "tools": "[]", "source": "x"}, {"source": 1, "conversations[].lang": 1}),
    ({"instruction": "I", "input": "", "output": "O", "category": "c"}, {"category": 1}),
    ({"instruction": "I", "instances": [{"input": "", "output": "O", "note": 1}], "id": "u1"},
     {"id": 1, "instances[].note": 1}),
    ({"query": "Q", "response": "A", "history": [], "images": []}, {"images": 1}),
    ({"history": [m("user", "Q"), m("assistant", "A")], "info": {}, "trajectory": []}, {"info": 1, "trajectory": 1}),
])
def test_unread_keys_of_each_shape(rec, expected):
    unread: list = []
    convert(rec, unread)
    assert Counter(unread) == Counter(expected)


def test_unread_keys_in_stats_and_summary_count_written_records_only(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [{"messages": PAIR_MSGS, "images": ["x.png"], "id": i} for i in range(3)]
    rows.append({"messages": [m("user", "Q"), m("assistant", "")], "images": ["y.png"]})  # rejected: not counted
    rows.append({"messages": [m("user", "Q"), {"role": "assistant", "content": "A", "reasoning_content": "r"}]})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stats,) = convert_inputs([src], tmp_path / "out.jsonl", ConvertOptions(progress=False))
    assert (stats.read, stats.written, stats.n_rejected) == (5, 4, 1)
    assert stats.unread == Counter({"images": 3, "id": 3, "messages[].reasoning_content": 1})
    assert main([str(src), "-o", str(tmp_path / "cli.jsonl"), "--no_progress"]) == 0
    assert "unread keys: id=3, images=3, messages[].reasoning_content=1" in capsys.readouterr().out


def test_unread_counts_add_up_across_batches(tmp_path):
    """More records than one progress batch (1024), every third one rejected: only written records count."""
    src = tmp_path / "many.jsonl"
    rows = [{"messages": [m("user", "Q"), m("assistant", "" if i % 3 == 0 else "A")], "id": i} for i in range(2500)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stats,) = convert_inputs([src], tmp_path / "out.jsonl", ConvertOptions(progress=False))
    assert stats.written == 2500 - 834 and stats.unread == Counter(id=stats.written)


def test_unread_key_names_that_cannot_print_are_escaped(tmp_path, capsys):
    src = tmp_path / "odd.jsonl"
    src.write_text('{"messages":[{"role":"user","content":"Q"},{"role":"assistant","content":"A"}],'
                   '"\\ud800":1,"%s":2}\n' % ("k" * 200))
    assert main([str(src), "-o", str(tmp_path / "out.jsonl"), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "unread keys: " in out and "\\ud800=1" in out and "k" * 80 + "…=1" in out
