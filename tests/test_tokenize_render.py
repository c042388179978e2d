"""The fast paths switch themselves off when they would differ from the reference.

    python -m pytest -q tests/test_tokenize_render.py
"""

from __future__ import annotations

import pytest

from qwen_sft.conversation import RecordError, normalize_record
from qwen_sft.tokenize.encoder import Encoder
from qwen_sft.tokenize.render import Renderer
from qwen_sft.tokenize.sample import SampleTokenizer

IM_START, IM_END = 151644, 151645
INJECTING = ("{%- if messages[0].role != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
             "{%- endif %}{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content | trim + '<|im_end|>\\n' }}"
             "{%- endfor %}")


@pytest.fixture(scope="module")
def injecting_tok(offline_tok_dir):
    """A separate tokenizer instance whose template injects a default system prompt and trims content."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(offline_tok_dir))
    tok.chat_template = INJECTING
    return tok


def test_template_with_default_system_turns_the_plain_renderer_off(injecting_tok):
    st = SampleTokenizer(injecting_tok)
    assert not st.renderer.plain and st.renderer.name == "compiled"
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello \n"}]}
    sample = st.tokenize(record)
    text = injecting_tok.apply_chat_template(record["messages"], tokenize=False)
    assert sample.input_ids.tolist() == injecting_tok(text, add_special_tokens=False).input_ids
    assert sample.input_ids.tolist()[:3] == [IM_START, 8948, 198]  # the injected system turn, not supervised
    assert [x for x in sample.label.tolist() if x != -100] == [14990, IM_END]  # content trimmed by the template


def test_verify_drops_a_renderer_that_differs(offline_tok):
    renderer = Renderer(offline_tok)
    assert renderer.plain and renderer.fast
    renderer._template = type("Wrong", (), {"render": staticmethod(lambda **kw: "different")})()
    renderer.plain = False
    assert not renderer.verify([([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], None)])
    assert renderer.name == "apply_chat_template"
    assert renderer.render([{"role": "user", "content": "x"}], None) == "<|im_start|>user\nx<|im_end|>\n"


def test_verify_drops_a_fast_encoder_that_differs(offline_tok):
    enc = Encoder(offline_tok)
    assert enc.name == "tiktoken"

    class Off:
        def encode(self, text, allowed_special):
            return [0]

    enc._tt = Off()
    assert not enc.verify(["hello world"]) and enc.name == "hf"
    assert enc.encode("hello world") == offline_tok("hello world", add_special_tokens=False).input_ids


def test_hf_engine_is_selectable_and_identical(offline_tok):
    text = "<|im_start|>user\n안녕 def f(x):\n\treturn x  \n<|im_end|>\n"
    assert Encoder(offline_tok, "hf").encode(text) == Encoder(offline_tok, "tiktoken").encode(text)
    with pytest.raises(ValueError, match="engine='fast'"):
        Encoder(offline_tok, "fast")


def test_tools_given_as_json_string_are_parsed(offline_tok):
    record = {"tools": '[{"type": "function", "function": {"name": "f", "parameters": {}}}]',
              "messages": [{"role": "user", "content": "x"}]}
    _, tools = normalize_record(record, ())
    assert tools == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(RecordError, match="invalid_json_field"):
        normalize_record({**record, "tools": "[oops"}, ())
    _, tools = normalize_record({**record, "tools": "[]"}, ())
    assert tools is None  # an empty tool list renders no tools block, like no tools at all


def test_extra_keys_never_reach_the_template():
    record = {"id": 7, "messages": [{"role": "user", "content": "x", "name": "bob", "weight": 2},
                                    {"role": "assistant", "content": None, "tool_calls": [
                                        {"id": "c1", "function": {"name": "f", "arguments": None}}]}]}
    messages, _ = normalize_record(record, ())
    assert messages == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}]
