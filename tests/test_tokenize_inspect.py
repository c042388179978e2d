"""``qwen-sft inspect`` decodes with the data path's light tokenizer: no torch, no transformers, and the very output
the transformers tokenizer gave (tests/fixtures/inspect/expected.json, written by the transformers-based inspect).

    python -m pytest -q tests/test_tokenize_inspect.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_data import FIXTURES, need_fixture

from qwen_sft.tokenize import inspect

REPO = Path(__file__).resolve().parent.parent
SAMPLES = FIXTURES / "inspect" / "samples.jsonl"
EXPECTED = FIXTURES / "inspect" / "expected.json"


@pytest.fixture(scope="module")
def expected() -> dict[str, list[str]]:
    return json.loads(need_fixture(EXPECTED).read_text(encoding="utf-8"))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_output_is_what_the_transformers_tokenizer_gave(index, expected, tmp_path, capsys):
    """Sample 0: system prompt, tools, Korean text and emoji, a tool call; 1: accents and «»; 2: a supervised span
    that starts inside a UTF-8 character, and a label that differs from its id (the warning)."""
    samples = str(need_fixture(SAMPLES))
    for color in ("never", "always"):
        assert inspect.main([samples, "-n", str(index), "--color", color]) == 0
        assert capsys.readouterr().out == expected[color][index]
    page = tmp_path / "page.html"
    assert inspect.main([samples, "--index", str(index), "-m", "offline", "--html", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == expected["html"][index]


def test_inspect_imports_neither_torch_nor_transformers(tmp_path):
    code = ("import sys; from qwen_sft.tokenize.inspect import main; "
            f"rc = main([{str(need_fixture(SAMPLES))!r}, '-n', '0', '--html', {str(tmp_path / 'p.html')!r}]); "
            "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "p.html").read_text(encoding="utf-8").startswith("<!doctype html>")


def test_a_bad_index_is_refused_before_the_file_is_read(tmp_path, capsys):
    assert inspect.main([str(tmp_path / "absent.jsonl"), "--index", "-1", "--color", "never"]) == 2
    assert capsys.readouterr().err == "error: --index -1 must be 0 or more\n"
