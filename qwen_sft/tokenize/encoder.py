"""Text → token ids, identical to the HF tokenizer, fast where that is proven.

Qwen3-Coder's tokenizer is byte-level BPE: NFC normalizer, Qwen2's split regex, merges in rank
order, added tokens matched before everything else. tiktoken runs the same algorithm several times
faster, so we build a tiktoken ``Encoding`` from the loaded tokenizer's *own* vocabulary, added tokens
and split regex (never from a second copy of the ranks), and use it only after it reproduced
``tok(text, add_special_tokens=False).input_ids`` on every probe and on the first texts of the run.
Any difference, or any tokenizer whose layout we do not recognise, means the HF tokenizer is used.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import numpy as np

# Shapes where a regex or merge-order difference would show: boundaries, whitespace runs, digits,
# contractions, scripts, emoji, control tokens, non-NFC input, code.
PROBES: tuple[str, ...] = (
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n\nhello  <|im_end|>\n",
    "def f(x):\n    return x**2  \n\n\n\t\tpass\r\n  \n",
    "I'm   you'RE they'll 12345 3.14159 0x1F ＡＢＣ  ",
    "안녕하세요, 세계! 你好，世界。 こんにちは 🤖🧑‍💻👍🏽 e\u0301 Å",
    "<tool_call>\n<function=run>\n<parameter=cmd>\nls -la\n</parameter>\n</function>\n</tool_call><|im_end|>",
    "<tool_response>\n{\"ok\": true}\n</tool_response>\n<|endoftext|><think></think><|fim_prefix|>",
    "   leading and trailing spaces   \n\n  ",
    "a\u00a0b\u2003c\u3000d \u200b e",
    "```python\nimport os\nprint(os.getcwd())\n```\n\n- item\n- item2\n",
    "\n\n\n\n    \n",
)


def _unicode_to_bytes() -> dict[str, int]:
    from qwen_sft.tokenizer import _bytes_to_unicode

    return {u: b for b, u in _bytes_to_unicode().items()}


def byte_length_table(tok: Any) -> np.ndarray:
    """Bytes each token id stands for (byte-level vocabulary; added tokens are their UTF-8 text)."""
    u2b = _unicode_to_bytes()
    vocab = tok.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    added = {t.content for t in tok.added_tokens_decoder.values()}
    for piece, idx in vocab.items():
        table[idx] = len(piece.encode()) if piece in added else sum(1 for ch in piece if ch in u2b)
    return table


def _tiktoken_encoding(tok: Any):
    """A tiktoken Encoding equivalent to ``tok``'s backend, or None when its layout is not recognised."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tok.backend_tokenizer.to_str())
    norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if norm not in (None, {"type": "NFC"}) or model.get("type") != "BPE":
        return None
    parts = pre.get("pretokenizers", [pre])
    split = [p for p in parts if p.get("type") == "Split"]
    if len(split) != 1 or "Regex" not in split[0].get("pattern", {}) or split[0].get("behavior") != "Isolated":
        return None
    if any(p.get("type") not in ("Split", "ByteLevel") or p.get("use_regex") for p in parts):
        return None
    u2b = _unicode_to_bytes()
    ranks = {bytes(u2b[ch] for ch in piece): idx for piece, idx in model["vocab"].items()}
    special = {t.content: idx for idx, t in tok.added_tokens_decoder.items()}
    return tiktoken.Encoding(
        name="qwen-sft-verified", pat_str=split[0]["pattern"]["Regex"], mergeable_ranks=ranks, special_tokens=special
    )


class Encoder:
    """``encode(text)`` with the tokenizer's exact ids; ``name`` says which engine produced them."""

    def __init__(self, tok: Any, engine: str = "auto") -> None:
        if engine not in ("auto", "hf", "tiktoken"):
            raise ValueError(f"{engine=}: expected auto, hf or tiktoken")
        self._backend = tok.backend_tokenizer
        self._tt = None if engine == "hf" else _tiktoken_encoding(tok)
        self._nfc = json.loads(self._backend.to_str()).get("normalizer") is not None
        self.name = "hf"
        if self._tt is not None:
            self.name = "tiktoken"
            self.verify(PROBES)
        elif engine == "tiktoken":
            raise ValueError("engine=tiktoken: this tokenizer's layout is not one tiktoken can reproduce")
        self.byte_len = byte_length_table(tok)

    def reference(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def normalize(self, text: str) -> str:
        """The text whose UTF-8 bytes the tokens concatenate to (the tokenizer's NFC normalizer applied)."""
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def encode(self, text: str) -> list[int]:
        if self._tt is None:
            return self.reference(text)
        return self._tt.encode(self.normalize(text), allowed_special="all")

    def verify(self, texts: list[str] | tuple[str, ...]) -> bool:
        """Keep the fast engine only while it equals the HF tokenizer on every text; else switch for good."""
        if self._tt is None:
            return True
        for text in texts:
            if self.encode(text) != self.reference(text):
                self._tt, self.name = None, "hf"
                return False
        return True
