"""The data path's tokenizer without transformers: held against transformers' own, which stays the reference.

    python -m pytest -q tests/test_light_tokenizer.py

LightTokenizer (qwen_sft/light_tokenizer.py) must build the very backend transformers builds, render every
conversation to the very text ``apply_chat_template`` gives, encode it to the same ids and hash to the same
fingerprint; and convert --tokenize / binarize_data.py must not import torch or transformers (the guard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from io import BytesIO
from pathlib import Path

import pytest

from qwen_sft.chat_template import compile_template, render
from qwen_sft.conversation import normalize_record
from qwen_sft.light_tokenizer import LightTokenizer, Unsupported, load_light
from qwen_sft.tokenize.fingerprint import tokenizer_fingerprint
from qwen_sft.tokenizer import load_data_tokenizer

REPO = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "template_fidelity.json").read_text(encoding="utf-8"))
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "a city"},
                                                "days": {"type": "integer", "enum": [1, 3]}},
                                                "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul", "days": 3}}}
CONVERSATIONS: list[tuple[list[dict], list[dict] | None]] = [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕 你好 🤖"},
      {"role": "assistant", "content": "\n\n  x = 1  \n"}, {"role": "user", "content": " again \n"},
      {"role": "assistant", "content": "done"}], None),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None),
    ([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Let me check. ", "tool_calls": [CALL]},
      {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": "<b>sunny</b>"},
      {"role": "assistant", "content": "21 and sunny."}], [WEATHER]),
    ([{"role": "system", "content": "You call tools."}, {"role": "user", "content": "go"},
      {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]}, {"role": "tool", "content": "ok"}],
     [WEATHER]),
    ([{"role": "user", "content": "<tool_call> literal and e\u0301 not NFC"},
      {"role": "assistant", "content": "x", "reasoning_content": "hidden"}], None),
    ([{"role": "user", "content": "only a question"}], [WEATHER]),
]


def all_conversations() -> list[tuple[list[dict], list[dict] | None]]:
    return CONVERSATIONS + [normalize_record(case["record"], ()) for case in FIXTURE["cases"]]


@pytest.fixture(scope="module")
def saved_dir(offline_tok, tmp_path_factory) -> Path:
    """What save_pretrained writes beside every model and adapter: tokenizer.json + chat_template.jinja."""
    path = tmp_path_factory.mktemp("saved") / "tok"
    offline_tok.save_pretrained(path)
    assert (path / "tokenizer.json").exists() and (path / "chat_template.jinja").exists()
    return path


def _pairs(request, offline_tok, saved_dir):
    from qwen_sft.tokenizer import load_tokenizer

    out = [(load_light(offline_tok.name_or_path), offline_tok), (load_light(saved_dir), load_tokenizer(str(saved_dir)))]
    spec = REPO.parent / "shared" / "spec" / "qwen3-coder-30b-a3b-instruct"
    if (spec / "tokenizer_config.json").exists():
        spec_tok = request.getfixturevalue("spec_tok")
        out.append((load_light(spec_tok.name_or_path), spec_tok))
    return out


@pytest.fixture(scope="module")
def pairs(request, offline_tok, saved_dir):
    """(light, transformers) for the offline directory, a save_pretrained directory and, with ../shared, the
    released tokenizer (vocab.json + merges.txt + the template inside tokenizer_config.json)."""
    return _pairs(request, offline_tok, saved_dir)


def test_light_backend_equals_transformers_backend_entry_for_entry(pairs):
    for light, hf in pairs:
        assert json.loads(light.backend_tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str()), hf.name_or_path
        assert light.get_vocab() == hf.get_vocab() and len(light) == len(hf) == 151_669
        assert light.model_vocab == hf.backend_tokenizer.get_vocab(with_added_tokens=False)
        assert {i: repr(t) for i, t in light.added_tokens_decoder.items()} == \
            {i: repr(t) for i, t in hf.added_tokens_decoder.items()}
        assert light.special_tokens_map == hf.special_tokens_map == {"eos_token": "<|im_end|>",
                                                                     "pad_token": "<|endoftext|>"}
        assert light.all_special_tokens == hf.all_special_tokens
        assert (light.eos_token_id, light.pad_token_id, light.bos_token) == (hf.eos_token_id, hf.pad_token_id, None)
        assert light.chat_template == hf.chat_template and light.name_or_path == hf.name_or_path


def test_light_renders_and_encodes_every_conversation_like_apply_chat_template(pairs):
    conversations = all_conversations()
    assert sum(tools is not None for _, tools in conversations) >= 6
    for light, hf in pairs:
        for messages, tools in conversations:
            for gen in (False, True):
                text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
                assert light.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=gen) == text
                assert light.encode(text) == hf(text, add_special_tokens=False).input_ids
        for token in ("<|im_end|>", "<tool_call>", "Ġthe", "not-a-token"):
            assert light.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token)
        assert light.convert_tokens_to_string(["Ċ", "ĠĠ"]) == hf.convert_tokens_to_string(["Ċ", "ĠĠ"]) == "\n  "
    # A template's own failure is the same failure.
    light, hf = pairs[0]
    import jinja2

    failing = "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    for tok in (hf, light):
        with pytest.raises(jinja2.exceptions.TemplateError, match="system first"):
            tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=failing, tokenize=False)


def test_light_renders_the_real_data_like_transformers(realdata_dir, pairs, tmp_path):
    from qwen_sft.data.cli import main as convert

    out = tmp_path / "chatml.jsonl"
    assert convert([str(realdata_dir), "-o", str(out), "--wrap_raw_arguments", "code", "--no_progress"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 500
    light, hf = pairs[0]
    for record in records:
        messages, tools = normalize_record(record, ())
        text = hf.apply_chat_template(messages, tools=tools, tokenize=False)
        assert light.apply_chat_template(messages, tools=tools, tokenize=False) == text
        assert light.encode(text) == hf(text, add_special_tokens=False).input_ids


def test_fingerprint_of_the_light_tokenizer_is_the_transformers_one(pairs):
    for light, hf in pairs:
        assert tokenizer_fingerprint(light) == tokenizer_fingerprint(hf)


def test_template_environment_is_transformers_environment():
    """Each feature transformers adds to its sandbox, rendered by both environments."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.skip %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% generation %}[{{ m.content | tojson }}|{{ m | tojson(indent=1) }}]"
        "{% endgeneration %}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}\n"
        "  {%- if tools %} {{ tools | tojson(sort_keys=true) }}{% endif %}\n"
        "{{ ns.n }} {{ dict(a=1) }} {{ eos_token }} {{ strftime_now('%Y') | length }}{{ add_generation_prompt }}"
    )
    messages = [{"role": "user", "content": "<a href='x'>é</a>", "n": None}, {"role": "user", "skip": True,
                "content": "s"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "user", "content": "d"}]
    theirs = _compile_jinja_template(template).render(messages=[{k: v for k, v in m.items() if v is not None}
                                                                for m in messages],
                                                      tools=[WEATHER], documents=None, add_generation_prompt=True,
                                                      eos_token="<|im_end|>")
    assert render(compile_template(template), messages, tools=[WEATHER], add_generation_prompt=True,
                  eos_token="<|im_end|>") == theirs
    assert '"<a href=\'x\'>é</a>"' in theirs  # tojson without HTML escaping, not ASCII-escaped
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no such role"):
        render(compile_template("{{ raise_exception('no such role') }}"), messages)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(compile_template("{% set ns = namespace(_x=1) %}"), messages)
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox: no reach into Python internals
        render(compile_template("{{ messages.__class__.__subclasses__() }}"), messages)


def test_unsupported_tokenizers_fall_back_to_transformers_with_a_log_line(offline_tok, saved_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (other / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    with pytest.raises(Unsupported, match="tokenizer_class 'PreTrainedTokenizerFast'"):
        load_light(other)
    tok = load_data_tokenizer(str(other))
    assert not isinstance(tok, LightTokenizer) and len(tok) == 151_669
    assert "loading it with transformers" in capsys.readouterr().err
    assert not isinstance(load_data_tokenizer(str(saved_dir), trust_remote_code=True), LightTokenizer)
    assert "--trust_remote_code" in capsys.readouterr().err
    assert isinstance(load_data_tokenizer("offline"), LightTokenizer) and capsys.readouterr().err == ""
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["x.T", None]}}))
    with pytest.raises(Unsupported, match="auto_map"):
        load_light(other)


def test_a_hub_name_loads_light_from_the_hub_cache(saved_dir, tmp_path, monkeypatch, capsys):
    """``-m Org/Name`` (the default is a hub name) reads the tokenizer files through huggingface_hub's cache."""
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--qwen-sft-test--tok" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (snapshot / name).write_bytes((saved_dir / name).read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    tok = load_data_tokenizer("qwen-sft-test/tok")
    assert isinstance(tok, LightTokenizer) and tok.name_or_path == "qwen-sft-test/tok"
    assert tokenizer_fingerprint(tok)["vocab_sha256"] == tokenizer_fingerprint(load_light(saved_dir))["vocab_sha256"]
    assert capsys.readouterr().err == ""


GUARD = """
import json, sys
from pathlib import Path
tmp = Path(sys.argv[1])
if sys.argv[2] == "convert":
    from qwen_sft.data.cli import main
    rc = main([str(tmp / "raw"), "--tokenize", "-m", "offline", "-o", str(tmp / "out" / "sft.jsonl"), "--no_progress"])
else:
    from qwen_sft.tokenize.binarize import main
    rc = main(["-input_path", str(tmp / "raw" / "five.jsonl"), "-output_path", str(tmp / "bin.jsonl"),
               "-tokenizer_path", "offline", "--no-progress"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "matplotlib"))
# imported only where they work: a bar on a terminal, Arrow/Parquet files, inputs of tiktoken_min_bytes and more
lazy = sorted({m.split(".")[0] for m in sys.modules} & {"tqdm", "pyarrow", "tiktoken"})
print(json.dumps({"rc": rc, "heavy": heavy, "lazy": lazy}))
"""


@pytest.mark.parametrize("entry", ["convert", "binarize"])
def test_convert_tokenize_and_binarize_import_neither_torch_nor_transformers(entry, offline_tok_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    (raw / "five.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", GUARD, str(tmp_path), entry], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": [], "lazy": []}, proc.stderr
    out = tmp_path / "out" / "sft.jsonl" if entry == "convert" else tmp_path / "bin.jsonl"
    assert len(out.read_text().splitlines()) == 5 and Path(f"{out}.stats.json").exists()


def test_length_plot_is_a_png_with_the_bars_and_the_max_len_line_and_the_same_bytes_twice():
    from PIL import Image

    from qwen_sft.tokenize.lengths_plot import WIDTH, draw_lengths, nice_ticks

    written, dropped = Counter({100: 5, 900: 2}), Counter({3000: 1})
    png = draw_lengths(written, dropped, max_len=2048, title="t")
    assert png == draw_lengths(written, dropped, max_len=2048, title="t")
    assert png != draw_lengths(written, Counter(), max_len=2048, title="t")
    image = Image.open(BytesIO(png)).convert("RGB")
    assert image.size == (WIDTH, 450)
    colours = [rgb for _, rgb in image.getcolors(maxcolors=WIDTH * 450)]
    assert any(r > 200 and g < 60 and b < 60 for (r, g, b) in colours)  # the red max_len line
    assert any(b > 150 and r < 120 for (r, g, b) in colours)  # blue bars
    assert nice_ticks(2150) == [0, 500, 1000, 1500, 2000] and nice_ticks(2.2, integer=True) == [0, 1, 2]


def test_merges_are_read_as_tokenizers_reads_them(tmp_path):
    from tokenizers.models import BPE

    from qwen_sft.light_tokenizer import Unsupported, _read_merges

    vocab = {"a": 0, "b": 1, "ab": 2, "\rx": 3, "a\rx": 4}
    path = tmp_path / "merges.txt"
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    path.write_bytes(b"#version: 0.2\r\na b\r\na \rx\n")  # CRLF ends; a lone \r inside a token stays a \r
    assert _read_merges(path) == [("a", "b"), ("a", "\rx")]
    assert _read_merges(path) == BPE.read_file(str(tmp_path / "vocab.json"), str(path))[1]
    path.write_bytes(b"a b\n\nb a\n")
    with pytest.raises(Unsupported, match="merge 2 is not two tokens"):
        _read_merges(path)
