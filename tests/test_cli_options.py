"""Options declared once: the data CLIs' parsers are built from dataclass fields (qwen_sft/cli_options.py).

    python -m pytest -q tests/test_cli_options.py
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_sft.cli_options import build_parser, declared_flags, option, parse
from qwen_sft.data import cli as convert_cli
from qwen_sft.data.options import ConvertOptions, ConvertRun
from qwen_sft.tokenize import binarize
from qwen_sft.tokenize import cli as tokenize_cli
from qwen_sft.tokenize.options import BinarizePaths, TokenizeOptions, TokenizePaths

REPO = Path(__file__).resolve().parent.parent
PARSERS = {"convert": (convert_cli.build_parser, [ConvertRun, ConvertOptions, TokenizeOptions]),
           "tokenize": (tokenize_cli.parser, [TokenizePaths, TokenizeOptions]),
           "binarize": (binarize.parser, [BinarizePaths, TokenizeOptions])}


def values(make, argv):
    built, problems = parse(make(), argv)
    assert problems == []
    return [dataclasses.asdict(b) for b in built]


def test_convert_old_spellings_parse_to_the_same_values(tmp_path):
    new = values(convert_cli.build_parser, ["./raw", "-o", "out.jsonl", "-s", "S", "--tokenize", "-m", "offline",
                                           "--max_len", "1024"])
    assert new == values(convert_cli.build_parser, ["-input_path", "./raw", "-output_path", "out.jsonl",
                                                    "-system_prompt", "S", "-t", "--model", "offline",
                                                    "--max_len", "1024"])
    assert new == values(convert_cli.build_parser, ["--input_dir", "./raw", "--output_path", "out.jsonl",
                                                    "--system_prompt", "S", "--tokenize", "true",
                                                    "-tokenizer_path", "offline", "-max_len", "1024"])
    run, opts, tok = new
    assert (run["input"], run["output"], run["tokenize"], opts["system"]) == ("./raw", "out.jsonl", True, "S")
    assert (tok["model"], tok["max_len"], tok["policy"], tok["progress"]) == ("offline", 1024, "assistant", True)
    legacy = values(convert_cli.build_parser, ["-input_dir", "./raw", "-output_dir", "./conv", "-merge"])[0]
    assert (legacy["input"], legacy["output_dir"], legacy["merge"]) == ("./raw", "./conv", True)


def test_convert_booleans_as_the_seed_passes_them():
    def strict(*argv):
        return values(convert_cli.build_parser, ["./raw", *argv])[1]["strict"]

    assert (strict(), strict("--strict"), strict("--strict", "true"), strict("--strict", "false")) == (
        False, True, True, False)
    # a bare boolean never swallows the next argument
    run, opts, _ = values(convert_cli.build_parser, ["--tokenize", "./raw", "--no_progress"])
    assert run["input"] == "./raw" and run["tokenize"] is True and opts["progress"] is False
    field_map = values(convert_cli.build_parser, ["./raw", "--map", "user=Q", "--map", "assistant=a.0.b"])[1]
    assert field_map["field_map"] == {"entries": (("user", ("Q",)), ("assistant", ("a", "0", "b")))}


def test_convert_conflicting_spellings_and_bad_values_are_all_reported():
    built, problems = parse(convert_cli.build_parser(), ["a", "-input_path", "b", "--split", "--eval_ratio", "1.5",
                                                         "--map", "user=Q", "-s", " "])
    assert built[0] is None and built[1] is None
    assert problems[0] == "INPUT 'a' and -input_path 'b' conflict; give one"
    assert any("--map needs both user=PATH and assistant=PATH" in p for p in problems)
    assert any("--eval_ratio must be between 0 and 1, found 1.5" in p for p in problems)
    assert any("-s/--system is empty" in p for p in problems)


def test_tokenize_and_binarize_spellings():
    seed = values(binarize.parser, ["-input_path", "in.jsonl", "-output_path", "out", "-tokenizer_path", "offline",
                                    "-max_len", "64", "-workers", "3", "-save_format", "arrow", "--no-progress"])
    assert seed == values(binarize.parser, ["--input_path", "in.jsonl", "-o", "out", "-m", "offline", "--max-len",
                                            "64", "--workers", "3", "--save_format", "arrow", "--no_progress"])
    paths, opts = seed
    assert paths == {"input_path": Path("in.jsonl"), "output_path": Path("out"), "save_format": "arrow"}
    assert opts == dataclasses.asdict(TokenizeOptions(model="offline", max_len=64, workers=3, progress=False))
    # binarize runs two workers unless told, qwen-sft tokenize one: one dataclass, two command defaults
    assert values(binarize.parser, ["-i", "a", "-o", "b"])[1]["workers"] == 2
    tok = values(tokenize_cli.parser, ["in.jsonl", "-o", "out.arrow", "--policy", "last", "--trust_remote_code"])
    assert tok[1]["workers"] == 1 and tok[1]["policy"] == "last" and tok[1]["trust_remote_code"] is True
    assert parse(tokenize_cli.parser(), ["in.jsonl", "-o", "o.jsonl", "--max_len", "1"])[1] == [
        "invalid tokenize options: self.max_len=1 must be at least 2"]


@pytest.mark.parametrize("name", PARSERS)
def test_help_text_is_the_dataclass_field_help(name):
    make, classes = PARSERS[name]
    parser = make()
    helps = {a.dest: a.help or "" for a in parser._actions}
    checked = 0
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") and f.name in helps:
                assert helps[f.name].startswith(f.metadata["help"]), (name, f.name)
                checked += 1
    assert checked >= 4
    text = parser.format_help()
    assert TokenizeOptions.__dataclass_fields__["max_len"].metadata["help"] in text


@pytest.mark.parametrize("name", PARSERS)
def test_no_flag_is_declared_twice(name):
    flags = declared_flags(PARSERS[name][0]())
    assert len(flags) == len(set(flags)) and "-h" in flags


def test_a_flag_declared_twice_fails_when_the_parser_is_built():
    @dataclasses.dataclass
    class Twice:
        a: int = option(1, "--workers", help="a")
        b: int = option(2, "--workers", help="b")

    with pytest.raises(argparse.ArgumentError, match="conflicting option string: --workers"):
        build_parser("x", [Twice])

    @dataclasses.dataclass
    class Other:
        max_len: int = option(1, "--other_max_len", help="same option name as TokenizeOptions.max_len")

    with pytest.raises(ValueError, match="'max_len' is declared by both TokenizeOptions and Other"):
        build_parser("x", [TokenizeOptions, Other])


def test_data_clis_import_neither_torch_nor_transformers():
    code = ("import sys, qwen_sft.data.cli, qwen_sft.tokenize.cli, qwen_sft.tokenize.binarize; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[]"
