"""A tqdm progress bar, or a stand-in that does nothing when no bar would show (no tqdm import then).

    from qwen_sft.progress import progress_bar
    with progress_bar(desc="convert", disable=None) as bar:   # None: only on a terminal, as tqdm's own rule
        bar.update(1024)

Why: importing tqdm costs ~45 ms (its ``__init__`` pulls ``tqdm.cli`` and ``importlib.metadata``), a noticeable part
of a 5-record run's start-up, and a disabled bar draws nothing anyway.
"""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """The slice of tqdm's API the data path uses, doing what a disabled bar does: nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(disable: bool | None = False, file: Any = None, **kwargs: Any) -> Any:
    """``tqdm(disable=disable, file=file, **kwargs)``, or a ``NoBar`` where tqdm would draw nothing: disabled, or
    ``disable=None`` and the output is not a terminal."""
    out = sys.stderr if file is None else file
    if disable or (disable is None and not (hasattr(out, "isatty") and out.isatty())):
        return NoBar()
    from tqdm import tqdm

    return tqdm(disable=disable, file=out, **kwargs)
