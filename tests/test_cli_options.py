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


# ---- every other verb: the same one declaration (merge, estimate, make-tiny-model, inspect, export-*, demo)

def _verb_parsers():
    from qwen_sft import demo
    from qwen_sft.export import options as export_options
    from qwen_sft.merge.options import MergeOptions, merge_parser
    from qwen_sft.model.tiny import TinyModelOptions, tiny_model_parser
    from qwen_sft.moe.estimate import EstimateInput, Options, TraceOptions, estimate_parser
    from qwen_sft.tokenize.inspect import InspectOptions, inspect_parser

    return {"merge": (merge_parser, [MergeOptions]),
            "estimate": (estimate_parser, [EstimateInput, Options, TraceOptions]),
            "make-tiny-model": (tiny_model_parser, [TinyModelOptions]),
            "inspect": (inspect_parser, [InspectOptions]),
            "export-gguf": (export_options.gguf_parser, [export_options.GgufExportOptions]),
            "export-adapter": (export_options.adapter_parser, [export_options.AdapterExportOptions]),
            "demo": (demo.demo_parser, [demo.DemoOptions])}


VERBS = ["merge", "estimate", "make-tiny-model", "inspect", "export-gguf", "export-adapter", "demo"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_of_a_verb_is_in_its_help_with_the_field_help(verb):
    make, classes = _verb_parsers()[verb]
    parser = make()
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    flags = declared_flags(parser)
    assert len(flags) == len(set(flags)) and "-h" in flags
    fields = [f for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("cli")]
    assert len(fields) >= 2
    for f in fields:
        assert " ".join(f.metadata["help"].split()) in text, (verb, f.name)
        for flag in (*f.metadata["flags"], *f.metadata["negate"]):
            assert flag in flags and flag in text, (verb, flag)
    assert all(flag in text for flag in flags)


def test_the_old_flags_keep_their_spellings_defaults_and_meaning():
    from qwen_sft.model.tiny import TinySpec
    from qwen_sft.moe.estimate import Options as EstimateOptions

    p = _verb_parsers()
    merge = values(p["merge"][0], ["--base_model_path", "B", "--train_adapters_path", "A", "--output_path", "O"])
    assert merge == values(p["merge"][0], ["--base_model_path", "B", "--adapter_path", "A", "--output_path", "O"])
    assert merge == [{"base_model_path": "B", "adapter_path": "A", "output_path": "O", "all_checkpoints": False,
                      "dtype": "bfloat16", "no_verify": False, "verify_device": "auto", "verify_atol": 0.02,
                      "verify_rtol": 0.02}]
    flagged = values(p["merge"][0], ["--base_model_path", "B", "--adapter_path", "A", "--output_path", "O",
                                     "--all_checkpoints", "--no_verify", "--dtype", "float32"])[0]
    assert (flagged["all_checkpoints"], flagged["no_verify"], flagged["dtype"]) == (True, True, "float32")

    source, opts, trace = values(p["estimate"][0], ["cfg.json"])
    assert source == {"model": "cfg.json"} and opts == dataclasses.asdict(EstimateOptions())
    assert (trace["trace"], trace["checkpointing"], trace["accumulating"], trace["loss"]) == (False, True, True,
                                                                                               "chunked")
    source, opts, trace = values(p["estimate"][0], [
        "cfg.json", "--mode", "full", "--lora-r", "16", "--zero", "3", "--offload", "--no-double-quant",
        "--no-expert-lora", "--trace", "--no-checkpointing", "--first-micro-step", "--gpu-memory", "80GiB",
        "--loss", "full", "--loss-chunk-tokens", "512", "--offload-activations"])
    assert (opts["mode"], opts["lora_r"], opts["zero"], opts["offload"], opts["double_quant"], opts["expert_lora"]) \
        == ("full", 16, 3, True, False, False)
    assert trace == {"trace": True, "routing": "uniform", "layers": "fit", "checkpointing": False,
                     "accumulating": False, "gpu_memory": "80GiB", "loss": "full", "loss_chunk_tokens": 512,
                     "offload_activations": True}

    tiny = values(p["make-tiny-model"][0], ["d", "--model-type", "qwen3_next", "--kv-heads", "1"])[0]
    assert tiny == values(p["make-tiny-model"][0], ["d", "--model_type", "qwen3_next", "--kv-heads", "1"])[0]
    assert (tiny["layers"], tiny["experts"], tiny["active"], tiny["kv_heads"]) == (4, 16, 10, 1)  # qwen3_next's own
    (plain,), _ = parse(p["make-tiny-model"][0](), ["d"])
    assert plain.spec() == TinySpec() and plain.out == Path("d")

    short = values(p["inspect"][0], ["f.jsonl", "-n", "3", "-m", "M", "--allow-pickle"])
    assert short == values(p["inspect"][0], ["f.jsonl", "--index", "3", "--model", "M", "--allow-pickle", "true"])
    assert short[0] == {"file": Path("f.jsonl"), "index": 3, "html": None, "model": "M", "color": "auto",
                        "allow_pickle": True}
    assert values(p["export-gguf"][0], ["m", "o.gguf"])[0] == {"merged_dir": Path("m"), "out": Path("o.gguf"),
                                                                "qtype": "bf16"}
    assert values(p["export-adapter"][0], ["a", "o"])[0]["format"] == "vllm"
    assert values(p["demo"][0], [])[0] == {"out": Path("demo_out"), "steps": None}


def test_every_problem_of_a_verb_is_reported_at_once(capsys):
    from qwen_sft.model.tiny import main as make_tiny_model

    with pytest.raises(SystemExit) as exc:
        make_tiny_model(["d", "--hidden", "0", "--experts", "2", "--active", "3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "qwen-sft make-tiny-model: error: --hidden must be at least 1, got 0; --active (3) cannot exceed --experts (2)")
    built, problems = parse(_verb_parsers()["merge"][0](), ["--base_model_path", "B", "--adapter_path", "A",
                                                             "--output_path", "O", "--verify_atol", "-1",
                                                             "--verify_rtol", "nan"])
    assert built == [None] and problems == [
        "--verify_atol must be 0 or more, found -1.0; --verify_rtol must be 0 or more, found nan"]


def test_the_merge_dtypes_are_the_options_choices():
    from typing import get_args

    from qwen_sft.export.gguf_export import TYPES
    from qwen_sft.export.options import GgufType
    from qwen_sft.merge.options import Dtype
    from qwen_sft.merge.stream import DTYPES

    assert get_args(Dtype) == DTYPES and get_args(GgufType) == TYPES


PARSE_ONLY = """
import sys
from qwen_sft.cli_options import parse
from qwen_sft.demo import demo_parser
from qwen_sft.export.options import adapter_parser, gguf_parser
from qwen_sft.merge.cli import build_parser as merge_parser
from qwen_sft.model.tiny import tiny_model_parser
from qwen_sft.moe.estimate import estimate_parser
from qwen_sft.tokenize.inspect import inspect_parser
import qwen_sft.cli, qwen_sft.export.gguf_export, qwen_sft.export.vllm_adapter
for make, argv in [(merge_parser, ["--base_model_path", "B", "--adapter_path", "A", "--output_path", "O"]),
                   (estimate_parser, ["cfg", "--trace", "--zero", "3", "--offload"]),
                   (tiny_model_parser, ["d", "--model_type", "qwen3_next"]), (inspect_parser, ["f", "-n", "1"]),
                   (gguf_parser, ["m", "o.gguf"]), (adapter_parser, ["a", "o"]), (demo_parser, ["--steps", "2"])]:
    built, problems = parse(make(), argv)
    assert problems == [] and None not in built, (make, problems)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_parsing_a_verb_imports_neither_torch_nor_transformers():
    """Parsers are built and argv parsed before anything heavy loads; the verbs' own modules (gguf_export,
    vllm_adapter) import torch only inside the functions that do the work, so ``--help`` stays light."""
    out = subprocess.run([sys.executable, "-c", PARSE_ONLY], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ---- the guard: no parser is written by hand in the package

HAND_WRITTEN = ("ArgumentParser", "add_argument", "add_argument_group", "add_mutually_exclusive_group",
                "add_subparsers")
OPTIONS_HOME = "qwen_sft/cli_options.py"  # the one place options become argparse calls


def _hand_written_parsers(path: str, source: str) -> list[str]:
    import ast

    if path == OPTIONS_HOME:
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in HAND_WRITTEN:
                found.append(f"{path}:{node.lineno}: {name}(…): declare the option with cli_options.option()")
    return found


def test_no_option_is_declared_outside_cli_options():
    """qwen_sft/cli.py dispatches verbs by hand (no subparsers), training's options are its dataclasses read by
    transformers' HfArgumentParser (qwen_sft/train/args.py): neither builds an argparse parser itself."""
    files = sorted((REPO / "qwen_sft").rglob("*.py"))
    assert len(files) > 50 and REPO / OPTIONS_HOME in files
    found = [hit for f in files for hit in _hand_written_parsers(f.relative_to(REPO).as_posix(),
                                                                  f.read_text(encoding="utf-8"))]
    assert found == []


def test_the_guard_sees_a_hand_written_parser():
    old = ("import argparse\np = argparse.ArgumentParser(prog='x')\np.add_argument('--seq', type=int)\n"
           "g = p.add_argument_group('t')\nfrom argparse import ArgumentParser\nq = ArgumentParser()\n")
    assert len(_hand_written_parsers("qwen_sft/x.py", old)) == 4
    assert _hand_written_parsers(OPTIONS_HOME, old) == []
