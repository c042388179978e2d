"""The progress bar stand-in: tqdm only where a bar would show.

    python -m pytest -q tests/test_progress.py
"""

from __future__ import annotations

import io

from qwen_sft.progress import NoBar, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_tqdm_where_no_bar_would_show_and_tqdm_where_one_would():
    assert isinstance(progress_bar(disable=True, file=Terminal()), NoBar)
    assert isinstance(progress_bar(disable=None, file=io.StringIO()), NoBar)  # None: only on a terminal
    with progress_bar(disable=None, file=Terminal(), desc="x") as bar:
        bar.update(3)
        assert type(bar).__name__ == "tqdm" and bar.n == 3
    with progress_bar(disable=True) as bar:
        bar.update(3)  # does nothing, as a disabled tqdm
