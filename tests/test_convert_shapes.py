"""Each record shape's conversion pinned exactly: record in → messages out, and each reject reason.

    python -m pytest -q tests/test_convert_shapes.py
"""

from __future__ import annotations

from collections import Counter

import pytest

from qwen_sft.conversation import RecordError, build_record
from qwen_sft.data.options import ConvertOptions, FieldMap
from qwen_sft.data.shapes import to_messages


def convert(rec: dict, notes: Counter | None = None, **opts) -> dict:
    notes = Counter() if notes is None else notes
    options = ConvertOptions(**opts)
    messages, tools = to_messages(rec, notes, options)
    return build_record(messages, tools, options.system, notes)


def reason(rec: dict, **opts) -> str:
    with pytest.raises(RecordError) as err:
        convert(rec, **opts)
    return err.value.reason


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
CALL = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}


def test_messages_kept_and_extra_keys_dropped():
    rec = {"id": 7, "messages": [{"role": "system", "content": "S", "agent": "main"},
                                 {"role": "user", "content": "Q", "name": "bob", "metainfo": {"img": 1}},
                                 {"role": "assistant", "content": "A", "thought": "t", "loss": False}, U, A]}
    assert convert(rec) == {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                         {"role": "assistant", "content": "A", "loss": False}, U, A]}


def test_messages_tool_calls_string_arguments_parallel_order_and_null_content():
    rec = {"messages": [U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
        {"function": {"name": "g", "arguments": {"y": "ü"}}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"}, {"role": "tool", "content": "2"}, A],
        "tools": "[{\"name\": \"f\", \"parameters\": {\"type\": \"object\"}}]"}
    assert convert(rec) == {"messages": [
        U, {"role": "assistant", "content": "", "tool_calls": [
            CALL, {"type": "function", "function": {"name": "g", "arguments": {"y": "ü"}}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"}, {"role": "tool", "content": "2"}, A],
        "tools": [{"type": "function", "function": {"name": "f", "description": "",
                                                    "parameters": {"type": "object", "properties": {}}}}]}


def test_typed_parts_text_value_reasoning_and_tool_call():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "b"}]},
                        {"role": "assistant", "content": [
                            {"type": "reasoning", "value": "think"}, {"type": "text", "value": "ok"},
                            {"type": "tool_call", "value": "{\"name\": \"f\", \"arguments\": {\"x\": 1}}"}]}]}
    notes: Counter = Counter()
    out = convert(rec, notes)
    assert out["messages"] == [{"role": "user", "content": "ab"},
                               {"role": "assistant", "content": "ok", "tool_calls": [CALL]}]
    assert notes["reasoning_dropped"] == 1
    kept = convert(rec, reasoning="keep")["messages"][1]["content"]
    assert kept == "think\n\nok"
    assert reason(rec, reasoning="reject") == "reasoning_part"


def test_sharegpt_function_call_observation_system_and_tools():
    rec = {"system": "S", "tools": "[]", "conversations": [
        {"from": "human", "value": "Q"},
        {"from": "function_call", "value": "[{\"name\": \"f\", \"arguments\": {\"x\": 1}}, "
                                           "{\"name\": \"g\", \"arguments\": \"{}\"}]"},
        {"from": "observation", "value": "r1"}, {"from": "gpt", "value": "A"}]}
    assert convert(rec) == {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "tool_calls": [
            CALL, {"type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "content": "r1"}, {"role": "assistant", "content": "A"}]}


def test_alpaca_empty_input_adds_nothing_history_and_system():
    assert convert({"instruction": "I", "input": "", "output": "O"})["messages"] == [
        {"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]
    rec = {"instruction": "I", "input": "X", "output": "O", "system": "S", "history": [["h1", "a1"]]}
    assert convert(rec)["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "h1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "I\n\nX"}, {"role": "assistant", "content": "O"}]
    assert convert({"instruction": "I", "response": "R"})["messages"][1] == {"role": "assistant", "content": "R"}


@pytest.mark.parametrize("user_key,assistant_key", [("input", "output"), ("instruction", "response"),
                                                    ("instruction", "output"), ("question", "answer"),
                                                    ("prompt", "completion"), ("prompt", "response"),
                                                    ("query", "response")])
def test_seed_pairs(user_key, assistant_key):
    out = convert({user_key: "질문", assistant_key: "답변", "meta": "never leaks"})
    assert out == {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답변"}]}


def test_self_instruct_single_instance_and_trajectory_history():
    rec = {"id": 1, "instruction": "I", "instances": [{"input": "", "output": "O"}]}
    assert convert(rec)["messages"] == [{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]
    assert reason({"instruction": "I", "instances": [{"input": "a", "output": "b"}] * 2}) == "instances_not_one"
    traj = {"environment": "x", "history": [U, {"role": "assistant", "content": "run", "tool_calls": [CALL]},
                                            {"role": "tool", "content": "", "tool_call_ids": ["c9"]}]}
    assert convert(traj)["messages"] == [U, {"role": "assistant", "content": "run", "tool_calls": [CALL]}]


def test_precedence_messages_over_pairs_and_alpaca_over_pairs():
    rec = {"messages": [U, A], "input": "x", "output": "y"}
    assert convert(rec)["messages"] == [U, A]
    rec = {"instruction": "I", "input": "X", "output": "O", "question": "q", "answer": "a"}
    assert convert(rec)["messages"][0] == {"role": "user", "content": "I\n\nX"}


def test_field_map_dotted_paths_repeat_join_and_missing():
    fmap = FieldMap.parse(["user=instruction", "user=instances.0.input", "assistant=instances.0.output"])
    rec = {"instruction": "I", "instances": [{"input": "X", "output": "O"}]}
    assert convert(rec, field_map=fmap)["messages"] == [{"role": "user", "content": "I\n\nX"},
                                                        {"role": "assistant", "content": "O"}]
    assert reason({"instruction": "I", "instances": []}, field_map=fmap) == "map_field_missing"
    nested = FieldMap.parse(["messages=data.chat"])
    assert convert({"data": {"chat": [U, A]}}, field_map=nested)["messages"] == [U, A]
    with pytest.raises(ValueError, match="needs both"):
        FieldMap.parse(["user=Q"])


def test_system_added_only_where_none():
    assert convert({"input": "q", "output": "a"}, system="S")["messages"][0] == {"role": "system", "content": "S"}
    rec = {"messages": [{"role": "system", "content": "mine"}, U, A]}
    assert convert(rec, system="S")["messages"][0] == {"role": "system", "content": "mine"}
    assert convert({"input": "q", "output": "a"})["messages"][0]["role"] == "user"  # no silent default


def test_non_object_arguments_rejected_or_wrapped():
    rec = {"messages": [U, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "python", "arguments": "l.remove(3)\nl"}}]}, {"role": "tool", "content": "x"}, A]}
    assert reason(rec) == "arguments_not_object"
    out = convert(rec, wrap_raw_arguments="code")
    assert out["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "python", "arguments": {"code": "l.remove(3)\nl"}}}]


def test_non_function_tools_dropped_with_a_note():
    notes: Counter = Counter()
    out = convert({"messages": [U, A], "tools": [{"type": "code_interpreter"}]}, notes)
    assert "tools" not in out and notes["non_function_tool_dropped"] == 1
    convert({"messages": [U, A], "tools": [{"type": "code_interpreter"}]}, notes)  # memoized list, still counted
    assert notes["non_function_tool_dropped"] == 2


@pytest.mark.parametrize("rec,expected", [
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "empty_assistant"),
    ({"messages": [U, {"role": "assistant", "content": None}]}, "empty_assistant"),
    ({"messages": [{"role": "user", "content": ""}, A]}, "empty_content"),
    ({"messages": [U]}, "no_supervised_tokens"),
    ({"messages": []}, "no_messages"),
    ({"messages": [{"role": "robot", "content": "x"}, A]}, "unknown_role"),
    ({"messages": [{"role": ["user"], "content": "x"}, A]}, "unknown_role"),
    ({"messages": [U, {"role": "assistant", "content": 5}]}, "wrong_type"),
    ({"messages": [U, A, {"role": "system", "content": "late"}, A]}, "system_not_first"),
    ({"messages": [U, {"role": "tool", "content": "r"}, A]}, "tool_without_call"),
    ({"messages": [U, {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "unsupported_content_part"),
    ({"messages": "not json"}, "invalid_json_field"),
    ({"input": None, "output": "a"}, "wrong_type"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown_role"),
    ({"instruction": "I", "output": "O", "history": [["only one"]]}, "wrong_type"),
    ({"text": "plain"}, "unknown_shape"),
    ({"messages": [U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "bad_tool_call"),
    ({"messages": [U, A], "tools": [{"type": "function", "function": {"description": "no name"}}]}, "bad_tool"),
])
def test_reject_reasons(rec, expected):
    assert reason(rec) == expected


def test_trailing_non_assistant_turns_dropped_and_counted():
    notes: Counter = Counter()
    out = convert({"messages": [U, A, {"role": "user", "content": "more?"}]}, notes)
    assert out["messages"] == [U, A] and notes["trailing_turns_dropped"] == 1
