"""What the opt-in consumer checks share (scripts/check_gguf.py, scripts/check_vllm.py): their two-step command
line and their verdict. Standard library only: ``consume`` runs in the consumer's own venv.

    python scripts/check_X.py prepare DIR             # project venv: builds the artifacts and the reference
    VENV/bin/python scripts/check_X.py consume DIR    # the consumer's venv: reads them, exit 1 on any failure
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def verdict(name: str, failures: list[str], passed: str) -> int:
    """Print every failure (exit code 1) or the one-line pass (0)."""
    if failures:
        print(f"{name} FAILED:\n  - " + "\n  - ".join(failures))
        return 1
    print(f"{name} passed: {passed}")
    return 0


def main(prepare: Callable[[Path], None], consume: Callable[[Path], int]) -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "consume"):
        sys.exit(f"usage: {Path(sys.argv[0]).name} prepare|consume DIR")
    mode, work = sys.argv[1], Path(sys.argv[2])
    if mode == "prepare":
        prepare(work)
        sys.exit(0)
    sys.exit(consume(work))
