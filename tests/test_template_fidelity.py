"""`-m offline` gives the released tokenizer's ids: the shipped template is the official one, byte for byte.

    python -m pytest -q tests/test_template_fidelity.py

The fixture (tests/fixtures/template_fidelity.json) holds conversations and the ids the released tokenizer
and its official template gave them (made once by tests/fixtures/make_template_fidelity.py), so the check
runs without ../shared; with ../shared/spec present the fixture itself is re-derived and compared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qwen_sft.conversation import normalize_record
from qwen_sft.samples.files import iter_samples
from qwen_sft.tokenize.pipeline import tokenize_chatml_file
from qwen_sft.tokenizer import TEMPLATE_PATH

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "template_fidelity.json").read_text(encoding="utf-8"))
CASES = FIXTURE["cases"]


def test_shipped_template_is_the_released_template_byte_for_byte(offline_tok):
    text = TEMPLATE_PATH.read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() == FIXTURE["template_sha256"]
    assert offline_tok.chat_template == text  # the cached offline tokenizer carries it, not an older copy


def test_offline_gives_the_released_text_and_ids_on_every_fixture_conversation(offline_tok, tmp_path):
    assert sum("tools" in c["record"] for c in CASES) >= 4
    for case in CASES:
        messages, tools = normalize_record(case["record"], ())
        assert offline_tok.apply_chat_template(messages, tools=tools, tokenize=False) == case["text"]
    # What differed before: non-string arguments are Python str() (not JSON), `return` schemas are listed.
    for rendered in ("\n['a', 'b']\n", "\n{'hidden': True, 'x': None}\n", "\nFalse\n", "\nNone\n", "\n0.5\n"):
        assert rendered in CASES[0]["text"]
    assert '<return>{"type": "array", "items": {"type": "string"}}</return>' in CASES[0]["text"]
    assert "<return>a JSON string with the temperature</return>" in CASES[1]["text"]
    src = tmp_path / "chatml.jsonl"
    src.write_text("".join(json.dumps(c["record"], ensure_ascii=False) + "\n" for c in CASES), encoding="utf-8")
    stats = tokenize_chatml_file(src, tmp_path / "out.jsonl", model="offline", progress=False)
    assert stats["samples"] == len(CASES), stats["rejected"]
    got = [ids for ids, _ in iter_samples(tmp_path / "out.jsonl")]
    for case, ids in zip(CASES, got, strict=True):
        assert ids == case["input_ids"], case["record"]["messages"][0]


def test_fixture_is_what_the_released_tokenizer_gives(spec_tok):
    assert hashlib.sha256(spec_tok.chat_template.encode()).hexdigest() == FIXTURE["template_sha256"]
    for case in CASES:
        messages, tools = normalize_record(case["record"], ())
        text = spec_tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert text == case["text"] and spec_tok(text, add_special_tokens=False).input_ids == case["input_ids"]


def test_convert_then_offline_tokenize_keeps_empty_system_and_tool_returns(tmp_path):
    """Convert and tokenize (one validate_conversation) keep what the template renders: an empty system
    message, a tool's ``return`` schema. The converted file tokenizes to the released ids."""
    from qwen_sft.data import cli

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(c["record"], ensure_ascii=False) + "\n" for c in CASES), encoding="utf-8")
    assert cli.main([str(raw), "-o", str(tmp_path / "chatml.jsonl"), "--no_progress"]) == 0
    converted = [json.loads(x) for x in (tmp_path / "chatml.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(converted) == len(CASES)
    assert [c["messages"][0] for c in converted[2:4]] == [{"role": "system", "content": ""}] * 2
    assert converted[1]["tools"][1]["function"]["return"] == "a JSON string with the temperature"
    stats = tokenize_chatml_file(tmp_path / "chatml.jsonl", tmp_path / "out.jsonl", model="offline", progress=False)
    assert stats["samples"] == len(CASES), stats["rejected"]
    got = [ids for ids, _ in iter_samples(tmp_path / "out.jsonl")]
    assert got == [c["input_ids"] for c in CASES]
    assert CASES[2]["text"].startswith("<|im_start|>system\n\n\nYou have access to the following functions:")
