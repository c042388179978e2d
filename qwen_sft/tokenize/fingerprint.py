"""Which tokenizer and chat template made a tokenized file: hashes that training checks against its own.

    from qwen_sft.tokenize.fingerprint import tokenizer_fingerprint
    tokenizer_fingerprint(load_tokenizer("offline"))["chat_template_sha256"]

Written into ``<output>.stats.json`` by the tokenize run (key ``tokenizer``); training compares it with the
tokenizer it saves beside the adapter and refuses data made with another template or vocabulary, because
the model would then be trained on one prompt format and served with another.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def chat_template_text(tok: Any) -> str:
    """The template ``apply_chat_template`` uses (and ``save_pretrained`` writes); "" when there is none."""
    if not tok.chat_template:
        return ""
    return tok.chat_template if isinstance(tok.chat_template, str) else tok.get_chat_template()


_VOCAB_HASHES: dict[int, tuple[Any, str, int]] = {}  # id(tok) -> (tok, sha256, size): hashing 151k entries takes ~1 s


def _vocab_hash(tok: Any) -> tuple[str, int]:
    hit = _VOCAB_HASHES.get(id(tok))
    if hit is not None and hit[0] is tok and hit[2] == len(tok):  # tokens added since: hash again
        return hit[1], hit[2]
    # LightTokenizer.get_vocab is a Python dict equal to the backend's (tests/test_light_tokenizer.py), without its ~0.3 s
    light = getattr(tok, "is_light", False)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True) if hasattr(tok, "backend_tokenizer") and not light \
        else tok.get_vocab()
    by_id: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, idx in vocab.items():
        by_id[idx] = token
    digest = hashlib.sha256(orjson.dumps(by_id)).hexdigest()
    _VOCAB_HASHES[id(tok)] = (tok, digest, len(vocab))
    return digest, len(vocab)


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """sha256 of the chat template text and of the id ↔ token table (added tokens included)."""
    vocab_sha, size = _vocab_hash(tok)
    return {
        "name_or_path": str(tok.name_or_path),
        "chat_template_sha256": hashlib.sha256(chat_template_text(tok).encode()).hexdigest(),
        "vocab_sha256": vocab_sha,
        "vocab_size": size,
    }
