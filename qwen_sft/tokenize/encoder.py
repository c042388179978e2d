"""Text → token ids, identical to the HF tokenizer, fast where that is proven.

Qwen3-Coder's tokenizer is byte-level BPE: NFC normalizer, Qwen2's split regex, merges in rank
order, added tokens matched before everything else. tiktoken runs the same algorithm several times
faster, so we build a tiktoken ``Encoding`` from the loaded tokenizer's *own* vocabulary, added tokens
and split regex (never from a second copy of the ranks), and use it only after it reproduced
``tok(text, add_special_tokens=False).input_ids`` on every probe and on the first texts of the run.
Any difference, or any tokenizer whose layout we do not recognise, means the HF tokenizer is used.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np
import orjson

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
    return _layout(tok).lens


class _Layout:
    """What the encoder needs from ``tok``, read once: byte length per id and NFC flag now, the tiktoken
    ``Encoding`` only when asked for (its ranks and build are ~0.3 s, more than a small file's whole encode)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        backend = tok.backend_tokenizer
        # Each component's own JSON state: serializing the whole tokenizer (merges included) costs seconds.
        self.norm = orjson.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
        self.pre = orjson.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
        self.nfc = self.norm is not None
        # A LightTokenizer keeps the BPE vocabulary it was built from (the backend's get_vocab costs ~0.3 s)
        vocab = getattr(tok, "model_vocab", None) or backend.get_vocab(with_added_tokens=False)
        u2b = _unicode_to_bytes()
        self.added = {t.content: idx for idx, t in tok.added_tokens_decoder.items()}
        self._pieces, self._ids = list(vocab), np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
        # Each stand-in character is one byte: map the whole joined vocabulary through a lookup table at once and
        # cut it at the pieces' lengths (str.translate per token was ~0.2 s of the start-up).
        codes = np.frombuffer("".join(self._pieces).encode("utf-32-le"), dtype=np.uint32)
        lut = np.full(max(map(ord, u2b)) + 1, -1, dtype=np.int16)
        lut[[ord(u) for u in u2b]] = list(u2b.values())
        mapped = lut[np.minimum(codes, len(lut) - 1)]
        byte_level = type(backend.model).__name__ == "BPE" and bool((codes < len(lut)).all() and (mapped >= 0).all())
        if not byte_level:
            raise ValueError("the tokenizer is not a byte-level BPE like Qwen3-Coder's; its labels cannot be placed")
        self._raw = mapped.astype(np.uint8).tobytes()
        self._sizes = np.fromiter(map(len, self._pieces), dtype=np.int64, count=len(self._pieces))
        self.lens = np.zeros(max([int(self._ids.max(initial=-1)), *self.added.values()]) + 1, dtype=np.int64)
        self.lens[self._ids] = self._sizes
        for content, idx in self.added.items():
            self.lens[idx] = len(content.encode())
        self._tiktoken: tuple[Any] | None = None

    def tiktoken(self) -> Any:
        """The tiktoken Encoding equivalent to ``tok``, or None if its layout differs (built on first use)."""
        if self._tiktoken is None:
            ends = np.cumsum(self._sizes).tolist()
            raw = self._raw
            ranks = dict(zip([raw[e - n:e] for e, n in zip(ends, self._sizes.tolist())], self._ids.tolist()))
            self._tiktoken = (_tiktoken_encoding(self.norm, self.pre, ranks, self.added),)
        return self._tiktoken[0]


_LAYOUTS: dict[int, _Layout] = {}  # id(tok) -> its layout (the entry keeps tok, so the id is not reused)


def _layout(tok: Any) -> _Layout:
    hit = _LAYOUTS.get(id(tok))
    if hit is None or hit.tok is not tok:
        hit = _LAYOUTS[id(tok)] = _Layout(tok)
    return hit


def _tiktoken_encoding(norm: Any, pre: dict, ranks: dict[bytes, int], added: dict[str, int]):
    """A tiktoken Encoding with the tokenizer's own ranks and split regex, or None if its layout differs."""
    try:
        import tiktoken
    except ImportError:
        return None
    if norm not in (None, {"type": "NFC"}):
        return None
    parts = pre.get("pretokenizers", [pre])
    split = [p for p in parts if p.get("type") == "Split"]
    if len(split) != 1 or "Regex" not in split[0].get("pattern", {}) or split[0].get("behavior") != "Isolated":
        return None
    if any(p.get("type") not in ("Split", "ByteLevel") or p.get("use_regex") for p in parts):
        return None
    return tiktoken.Encoding(
        name="qwen-sft-verified", pat_str=split[0]["pattern"]["Regex"], mergeable_ranks=ranks, special_tokens=added
    )


class Encoder:
    """``encode(text)`` with the tokenizer's exact ids; ``name`` says which engine produced them."""

    def __init__(self, tok: Any, engine: str = "auto") -> None:
        if engine not in ("auto", "hf", "tiktoken"):
            raise ValueError(f"{engine=}: expected auto, hf or tiktoken")
        self._backend = tok.backend_tokenizer
        layout = _layout(tok)
        self.byte_len, self._nfc = layout.lens, layout.nfc
        self._tt = None if engine == "hf" else layout.tiktoken()  # "hf": never built
        self.name = "hf"
        if self._tt is not None:
            self.name = "tiktoken"
            self.verify(PROBES)
        elif engine == "tiktoken":
            raise ValueError("engine=tiktoken: this tokenizer's layout is not one tiktoken can reproduce")

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
