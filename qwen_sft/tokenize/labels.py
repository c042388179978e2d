"""The loss mask: which bytes of a rendered conversation are supervised, and which tokens that makes.

Policy (shared/spec/README.md): each assistant turn's content — tool-call XML included — and its
``<|im_end|>`` are supervised; the ``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>``,
system, user and tool turns are not. A message's own ``"loss": true|false`` overrides the policy for
the turn that renders it.

A token belongs to the span its *first byte* lies in. The only tokens that straddle a span edge are
those where the header's ``\\n`` merges with the start of the content: the first token of
``tok("\\n" + content)`` when it is longer than ``"\\n"``. It starts in the header, so it is not
supervised (the header never is), and the content characters inside it are not trained on. With
Qwen3-Coder's vocabulary that happens only to content that opens with whitespace ending in a newline,
and exactly the prefixes ``header_merges`` lists lose their characters (docs/tokenize.md has the list):
supervising that token instead would teach a token the model can never emit at inference, where the
prompt already ends with the header's own ``\\n``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from qwen_sft.samples import IGNORE_INDEX  # defined in qwen_sft.samples; importable from here too
from qwen_sft.tokenize.turns import Turn

Policy = Literal["assistant", "last", "all"]
POLICIES: tuple[str, ...] = ("assistant", "last", "all")
__all__ = ["IGNORE_INDEX", "POLICIES", "Policy", "header_merges", "label_tokens", "supervised_spans", "token_starts"]


def header_merges(tok: Any) -> list[str]:
    """Every content prefix that merges with the header's ``\\n`` into one unsupervised token, shortest first.

    They are the vocabulary's whitespace tokens that start with ``\\n`` and end with a newline (Qwen2's split
    regex keeps ``\\s*[\\r\\n]+`` together, so only such a token can begin in the header and end in content).
    """
    out = []
    for token in tok.get_vocab():
        text = tok.convert_tokens_to_string([token])
        if len(text) > 1 and text[0] == "\n" and text.isspace() and text[-1] in "\r\n":
            out.append(text[1:])
    return sorted(out, key=lambda t: (len(t), t))


def supervised_spans(
    turns: list[Turn], owners: list[list[int]], roles: list[str], flags: list[bool | None], policy: Policy
) -> list[tuple[int, int]]:
    """Byte spans [start, end) of the rendered text that are trained on.

    ``owners[t]`` are the message indices turn ``t`` renders; ``roles``/``flags`` are per message.
    ``"assistant"``: every assistant turn; ``"last"``: the last assistant turn only; ``"all"``: every
    byte of every turn (headers and newlines included).
    """
    last = max((t for t, idx in enumerate(owners) if idx and roles[idx[0]] == "assistant"), default=-1)
    spans: list[tuple[int, int]] = []
    for t, (turn, idx) in enumerate(zip(turns, owners)):
        is_assistant = bool(idx) and roles[idx[0]] == "assistant"
        if policy == "all":
            on = True
        elif policy == "last":
            on = t == last
        else:
            on = is_assistant
        explicit = [flags[i] for i in idx if flags[i] is not None]
        if explicit:
            on = any(explicit)  # a grouped tool turn is trained on if any of its messages asks for it
        if not on:
            continue
        if policy == "all":
            nxt = turns[t + 1].start if t + 1 < len(turns) else turn.end + 1
            spans.append((turn.start, nxt))
        else:
            spans.append((turn.body, turn.end))
    return spans


def token_starts(ids: np.ndarray, byte_len: np.ndarray) -> np.ndarray:
    """Byte offset at which each token starts, plus the total (byte-level BPE: tokens concatenate to the text)."""
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(byte_len[ids], out=starts[1:])
    return starts


def label_tokens(ids: np.ndarray, starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """``ids`` where the token's first byte is inside a span, ``IGNORE_INDEX`` elsewhere."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    if spans:
        # one searchsorted for all span edges: per-call numpy overhead dominates on short samples
        edges = np.searchsorted(starts[:-1], np.asarray(spans).ravel(), side="left").tolist()
        for i0, i1 in zip(edges[::2], edges[1::2]):
            labels[i0:i1] = ids[i0:i1]
    return labels
