"""Loss controls of other formats survive convert → ChatML JSONL → tokenize, pinned on exact supervised token ids.

    python -m pytest -q tests/test_convert_loss.py

Each case converts a record with the control on its first answer, writes and re-reads the ChatML line as the
pipeline does, tokenizes it with the offline tokenizer and the released one (when ../shared is present), and
asserts the supervised ids are exactly the second answer's ids followed by <|im_end|>.
"""

from __future__ import annotations

import json
from collections import Counter

import orjson
import pytest

from qwen_sft.conversation import RecordError, build_record
from qwen_sft.data.cli import main
from qwen_sft.data.options import ConvertOptions
from qwen_sft.data.shapes import to_messages
from qwen_sft.tokenize.sample import SampleTokenizer

IM_END = 151645
_SAMPLERS: dict[int, SampleTokenizer] = {}


@pytest.fixture(params=["offline_tok", "spec_tok"])
def tok(request):
    return request.getfixturevalue(request.param)


def convert(rec: dict, **opts) -> dict:
    """One record through convert, serialized and parsed back exactly as the ChatML file carries it."""
    options = ConvertOptions(**opts)
    notes: Counter = Counter()
    messages, tools = to_messages(rec, notes, options)
    return orjson.loads(orjson.dumps(build_record(messages, tools, options.system, notes)))


def reason(rec: dict) -> str:
    with pytest.raises(RecordError) as err:
        convert(rec)
    return err.value.reason


def supervised_runs(tok, record: dict) -> list[list[int]]:
    sampler = _SAMPLERS.setdefault(id(tok), SampleTokenizer(tok))
    sample = sampler.tokenize(record)
    out, cur = [], []
    for lab in sample.label.tolist() + [-100]:
        if lab == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(lab)
    return out


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def openai(first: dict, second: dict) -> dict:
    return {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "first answer", **first},
                         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "second answer", **second}]}


def sharegpt(first: dict, second: dict) -> dict:
    return {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "first answer", **first},
                              {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "second answer", **second}]}


def parts(first_part_flags: list[dict], second: dict, first: dict | None = None) -> dict:
    """Axolotl/LLaMA-Factory typed parts: the first answer in two parts, each with its own flags."""
    texts = ("first ", "answer")
    content = [{"type": "text", "text": t, **f} for t, f in zip(texts, first_part_flags)]
    return {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": content, **(first or {})},
                         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "second answer", **second}]}


MASKED_FIRST = {
    "llamafactory loss_weight": openai({"loss_weight": 0.0}, {"loss_weight": 1.0}),
    "axolotl train": openai({"train": False}, {"train": True}),
    "axolotl weight": openai({"weight": 0}, {"weight": 1}),
    "functionary metadata.masked": openai({"metadata": {"masked": True}}, {"metadata": {"masked": False}}),
    "ms-swift loss": openai({"loss": False}, {}),
    "sharegpt weight": sharegpt({"weight": 0}, {}),
    "sharegpt train": sharegpt({"train": False}, {"train": True}),
    "parts train": parts([{"train": False}, {"train": False}], {}),
    "parts weight, message weight": parts([{"weight": 0}, {}], {}, first={"weight": 0}),
}


@pytest.mark.parametrize("name", list(MASKED_FIRST))
def test_masked_first_answer_is_not_supervised_exact_ids(tok, name):
    record = convert(MASKED_FIRST[name])
    assert record["messages"][1]["loss"] is False
    assert supervised_runs(tok, record) == [enc(tok, "second answer") + [IM_END]]


def test_without_controls_both_answers_are_supervised(tok):
    """The control above: the same record with no flags trains both answers (what main did with the flags too)."""
    assert supervised_runs(tok, convert(openai({}, {}))) == [enc(tok, "first answer") + [IM_END],
                                                             enc(tok, "second answer") + [IM_END]]


def test_axolotl_train_true_on_a_user_turn_supervises_it(tok):
    rec = sharegpt({}, {})
    rec["conversations"][2]["train"] = True
    assert supervised_runs(tok, convert(rec)) == [enc(tok, "first answer") + [IM_END], enc(tok, "Q2") + [IM_END],
                                                  enc(tok, "second answer") + [IM_END]]


def test_trailing_turn_with_train_true_is_kept():
    rec = openai({}, {})
    rec["messages"].append({"role": "user", "content": "Q3", "train": True})
    assert convert(rec)["messages"][-1] == {"role": "user", "content": "Q3", "loss": True}
    rec["messages"][-1].pop("train")
    assert convert(rec)["messages"][-1]["content"] == "second answer"  # untrained trailing turn: dropped


@pytest.mark.parametrize(("rec", "expected"), [
    (openai({"loss_weight": 0.5}, {}), "unsupported_loss_weight"),
    (openai({"weight": 2}, {}), "unsupported_loss_weight"),
    (openai({"loss_weight": "1"}, {}), "unsupported_loss_weight"),
    (openai({"train": "false"}, {}), "wrong_type"),
    (openai({"metadata": {"masked": "yes"}}, {}), "wrong_type"),
    (openai({"train": True, "loss_weight": 0}, {}), "conflicting_loss_flags"),
    (openai({"train_detail": [{"begin_offset": 0, "end_offset": 4, "train": False}]}, {}), "train_detail_unsupported"),
    (sharegpt({"train_detail": [{"begin_offset": 0, "end_offset": 4, "train": True}]}, {}), "train_detail_unsupported"),
    (parts([{"train": False}, {"train": True}], {}), "mixed_part_loss"),
    (parts([{"train": False}, {}], {}), "mixed_part_loss"),  # the unflagged part follows the policy: trained
    (openai({"loss": False}, {"train": False}), "no_supervised_tokens"),
])
def test_controls_that_cannot_be_honoured_are_rejected(rec, expected):
    assert reason(rec) == expected


def test_grouped_tool_results_with_different_flags_are_rejected():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    rec = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [call, call]},
                        {"role": "tool", "content": "1", "train": True}, {"role": "tool", "content": "2"},
                        {"role": "assistant", "content": "A"}]}
    assert reason(rec) == "mixed_loss_in_turn"
    rec["messages"][3]["train"] = True
    assert [m.get("loss") for m in convert(rec)["messages"]] == [None, None, True, True, None]


def test_functionary_masked_turn_is_not_trained_end_to_end(realdata_dir, tmp_path, offline_tok_dir):
    """../shared/realdata/functionary__test_case.json: the turn its authors masked (the buggy l.remove(3.6) call).

    Converted and tokenized by the CLI, once as published and once with the mask removed: the masked run is
    exactly the one missing, every other supervised id is the same.
    """
    from tests.conftest import SPEC_TOKENIZER

    model = str(SPEC_TOKENIZER) if (SPEC_TOKENIZER / "tokenizer_config.json").exists() else "offline"
    src = realdata_dir / "functionary__test_case.json"
    unmasked = json.loads(src.read_text())
    masked_index = next(i for i, m in enumerate(unmasked["messages"]) if "metadata" in m)
    del unmasked["messages"][masked_index]["metadata"]
    (tmp_path / "unmasked.json").write_text(json.dumps(unmasked))
    labels = {}
    for name, path in (("masked", src), ("unmasked", tmp_path / "unmasked.json")):
        out = tmp_path / f"{name}.jsonl"
        assert main([str(path), "-o", str(out), "--wrap_raw_arguments", "code", "--tokenize", "-m", model,
                     "--no_progress"]) == 0
        chatml = [json.loads(line) for line in (tmp_path / f"{name}.chatml.jsonl").read_text().splitlines()]
        assert len(chatml) == 1
        flags = [m.get("loss") for m in chatml[0]["messages"]]
        assert flags == [False if (name == "masked" and i == masked_index) else None for i in range(len(flags))]
        (sample,) = [json.loads(line) for line in out.read_text().splitlines()]
        runs, cur = [], []
        for lab in sample["label"] + [-100]:
            if lab == -100:
                if cur:
                    runs.append(cur)
                cur = []
            else:
                cur.append(lab)
        labels[name] = runs
    from qwen_sft.tokenizer import load_tokenizer

    tok = load_tokenizer(model if model != "offline" else str(offline_tok_dir))
    texts = [tok.decode(run) for run in labels["unmasked"]]
    n_assistant = sum(m["role"] == "assistant" for m in unmasked["messages"])
    assert len(labels["unmasked"]) == n_assistant == 10
    (k,) = [i for i, t in enumerate(texts) if "l.remove(3.6)" in t]
    assert labels["masked"] == labels["unmasked"][:k] + labels["unmasked"][k + 1:]
    assert any("l.remove(round(3.6))" in tok.decode(run) for run in labels["masked"])
