"""The checked-in fixtures are the published files, byte for byte, and CI=true fails a skip for a missing one.

    CI=true python -m pytest -q tests/test_fixtures.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_data import FIXTURES, REALDATA, REALDATA_SUMS, SPEC_SUMS, check_sums, read_sums

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def test_realdata_fixtures_are_the_published_files():
    names = read_sums(REALDATA_SUMS)
    assert len(names) == 6 and {p.name for p in REALDATA.iterdir()} == set(names)  # nothing unlisted rides along
    check_sums(REALDATA, REALDATA_SUMS)


def test_released_model_dir_is_the_released_files(spec_dir):
    # spec_dir (conftest) rebuilt vocab.json and merges.txt from the offline ranks; every file has its sha256.
    assert {p.name for p in spec_dir.iterdir()} == set(read_sums(SPEC_SUMS)) == {
        "config.json", "generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"}


def test_fixtures_equal_the_shared_originals():
    """Where ../shared is beside the checkout (the team's machines), the copies still equal their originals."""
    if not SHARED.is_dir():
        pytest.skip("../shared absent: nothing to compare the checked-in copies with")
    check_sums(SHARED / "realdata", REALDATA_SUMS)
    check_sums(SHARED / "spec" / "qwen3-coder-30b-a3b-instruct", SPEC_SUMS)


CASES = '''
from pathlib import Path

import pytest
from fixture_data import need_fixture

MISSING = Path(__file__).with_name("absent.json")


@pytest.fixture
def data():
    return need_fixture(MISSING)


def test_fixture_missing_in_setup(data):
    pass


def test_fixture_missing_in_body():
    need_fixture(MISSING)


def test_fixture_present():
    assert need_fixture(Path(__file__)).is_file()


def test_gpu_skip():
    pytest.skip("needs a CUDA GPU")


@pytest.mark.skipif(True, reason="opt-in tier")
def test_opt_in():
    pass
'''


def _outcomes(tmp_path: Path, ci: str | None) -> tuple[int, dict[str, int], str]:
    (tmp_path / "conftest.py").write_text("from fixture_data import pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(Path(__file__).parent)}
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return proc.returncode, counts, proc.stdout


def test_missing_fixture_skips_locally(tmp_path):
    code, counts, out = _outcomes(tmp_path, None)
    assert code == 0 and counts == {"passed": 1, "skipped": 4}, out
    assert out.count("missing fixture: ") == 2, out


def test_missing_fixture_fails_under_ci_but_gpu_and_opt_in_skips_stay(tmp_path):
    code, counts, out = _outcomes(tmp_path, "true")
    # a failure in a fixture is an error of the test's setup, as pytest reports any setup failure
    assert code == 1 and counts == {"passed": 1, "failed": 1, "error": 1, "skipped": 2}, out
    assert "ERROR test_cases.py::test_fixture_missing_in_setup" in out
    assert "FAILED test_cases.py::test_fixture_missing_in_body" in out
    assert "CI=true: a test whose fixture is missing fails instead of skipping" in out
    assert "needs a CUDA GPU" in out and "opt-in tier" in out


def test_fixture_readme_names_every_fixture():
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    for name in [*read_sums(REALDATA_SUMS), *read_sums(SPEC_SUMS), "template_fidelity.json"]:
        assert f"`{name}`" in readme, name
