"""One ChatML record → (input_ids, label), or a RecordError with its reason (``qwen_sft.conversation``).

    from qwen_sft.tokenizer import load_tokenizer
    st = SampleTokenizer(load_tokenizer("offline"))
    sample = st.tokenize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})

Render once with the template, tokenize once, label tokens by byte spans (labels.py), then apply the
length rule of qwen_sft/samples/length.py (the one training applies too): over-length samples are dropped,
or — with ``overlength="truncate"`` — cut after the last whole turn that fits and still leaves a supervised
token; only when no such turn boundary exists is the sample cut inside a turn, and a cut that would end inside
a ``<tool_call>`` is moved back to just before that call (kept half calls are counted, never silent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qwen_sft.conversation.chatml import loss_flags, normalize_record
from qwen_sft.conversation.errors import RecordError
from qwen_sft.conversation.types import Message
from qwen_sft.conversation.validate import validate_conversation
from qwen_sft.samples import IGNORE_INDEX
from qwen_sft.samples.length import NothingSupervised, TurnMarks, cut_to_length, fits
from qwen_sft.tokenize.align import align_turns
from qwen_sft.tokenize.encoder import Encoder
from qwen_sft.tokenize.labels import Policy, label_tokens, supervised_spans, token_starts
from qwen_sft.tokenize.render import Renderer
from qwen_sft.tokenize.turns import parse_turns

Overlength = Literal["drop", "truncate"]


@dataclass
class Sample:
    input_ids: np.ndarray  # int32
    label: np.ndarray  # int32, IGNORE_INDEX where not supervised
    full_length: int  # tokens before any truncation
    cut: str = ""  # "", "turn", "mid_turn" or "in_tool_call"


class Overlong(Exception):
    """The sample is longer than max_len and the policy drops it."""

    def __init__(self, length: int, reason: str = "overlength", exact: bool = True) -> None:
        super().__init__(f"{length} tokens" if exact else f"at least {length} tokens")
        self.length = length  # with exact=False a lower bound: the record was never tokenized
        self.reason = reason
        self.exact = exact


class SampleTokenizer:
    """Template render + one-pass encode + byte-span labels for one record at a time."""

    def __init__(
        self, tok: Any, *, max_len: int = 2048, policy: Policy = "assistant", overlength: Overlength = "drop",
        engine: str = "auto",
    ) -> None:
        self.tok = tok
        self.max_len, self.policy, self.overlength = max_len, policy, overlength
        self.renderer = Renderer(tok)
        self.encoder = Encoder(tok, engine)
        self.max_token_bytes = max(int(self.encoder.byte_len.max()), 1)
        self.special = tuple(t.content for t in tok.added_tokens_decoder.values() if t.special)
        self.marks = TurnMarks.of(tok)

    def render(self, record: Any) -> tuple[str, list[Message], list[dict] | None]:
        """Read and validate the record (the conversation contract, as convert does), then render it."""
        messages, tools = normalize_record(record, self.special)
        # ChatML's own loss semantics: a flag on one grouped tool message supervises the grouped turn
        validate_conversation(messages, loss_flags(record), grouped="any")
        try:
            text = self.renderer.render(messages, tools)
        except Exception as err:  # noqa: BLE001 - jinja raises anything; the record is what is wrong
            raise RecordError("template_error", f"the chat template failed: {type(err).__name__}: {err}") from None
        return text, messages, tools

    def verify(self, records: list[Any]) -> None:
        """Check the compiled template and the fast encoder against the reference on real records."""
        rendered = []
        for record in records:
            try:
                rendered.append(self.render(record))
            except Exception:  # noqa: BLE001 - a record that cannot render is the run's reject, not a probe
                continue
        self.renderer.verify([(m, t) for _, m, t in rendered])
        self.encoder.verify([text for text, _, _ in rendered])

    def tokenize(self, record: Any) -> Sample:
        text, messages, _ = self.render(record)
        text = self.encoder.normalize(text)
        data = text.encode()
        # Tokens concatenate to these bytes and none is longer than max_token_bytes: a text that must be over
        # max_len even so is dropped before tokenizing (a 50 MB turn took minutes and GBs only to be dropped).
        at_least = -(-len(data) // self.max_token_bytes)
        if not fits(at_least, self.max_len) and self.overlength == "drop":
            raise Overlong(at_least, exact=False)
        turns = parse_turns(data)
        owners = align_turns(turns, messages)
        spans = supervised_spans(turns, owners, [m["role"] for m in messages], loss_flags(record), self.policy)
        ids = np.asarray(self.encoder.encode(text), dtype=np.int32)
        starts = token_starts(ids, self.encoder.byte_len)
        if starts[-1] != len(data):
            raise RecordError("tokenizer_bytes", f"tokens cover {starts[-1]} bytes of a {len(data)}-byte text")
        labels = label_tokens(ids, starts, spans)
        if not (labels != IGNORE_INDEX).any():
            raise RecordError("no_supervised_tokens", f"policy {self.policy!r} and the loss flags leave nothing to train on")
        if fits(len(ids), self.max_len):
            return Sample(ids, labels, len(ids))
        if self.overlength == "drop":
            raise Overlong(len(ids))
        try:
            end, kind = cut_to_length(ids, labels, self.max_len, self.marks)
        except NothingSupervised:
            raise Overlong(len(ids), "overlength_nothing_supervised_in_window") from None
        return Sample(ids[:end], labels[:end], len(ids), kind)
