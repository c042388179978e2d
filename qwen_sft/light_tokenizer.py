"""The Qwen2-family tokenizer and its chat template from the ``tokenizers`` library and jinja2 alone.

    from qwen_sft.light_tokenizer import load_light
    tok = load_light("../shared/spec/qwen3-coder-30b-a3b-instruct")
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    ids = tok.encode(text)

Why: ``AutoTokenizer`` imports transformers and with it torch, about 6 s before the first record on the
2-core development machine, for a data path that needs a BPE and a template. This builds the very backend
``transformers.Qwen2Tokenizer`` builds (same BPE arguments, NFC normalizer, split regex, byte-level
pre-tokenizer and decoder, added tokens with their flags and ids) and renders with transformers' sandboxed
Jinja environment (``qwen_sft/chat_template.py``). It reads a local directory (``tokenizer_config.json`` plus
``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, an optional ``chat_template.jinja``). Anything else —
another tokenizer class, code shipped with the tokenizer (``auto_map``), a layout we do not mirror — raises
``Unsupported`` and the caller loads transformers' tokenizer instead (``qwen_sft.tokenizer.load_data_tokenizer``).
``tests/test_light_tokenizer.py`` holds this against transformers: backend state, vocabulary, ids, rendered
text and fingerprints.
"""

from __future__ import annotations

import json
import os
from operator import methodcaller
from pathlib import Path
from typing import Any

import orjson
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from qwen_sft.chat_template import compile_template, render

# transformers 5.x models/qwen2/tokenization_qwen2.py: the classes whose construction this module mirrors
SUPPORTED_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": None, "eos_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}  # Qwen2Tokenizer.__init__'s defaults for keys the config lacks
# Qwen2Tokenizer's BPE arguments
BPE_OPTIONS = {"dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
               "fuse_unk": False, "byte_fallback": False}
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class Unsupported(ValueError):
    """This tokenizer directory is not one the light loader reproduces; load it with transformers."""


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a serialized AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise Unsupported(f"special token entry {value!r} is neither a string nor an AddedToken")


def _added_token(fields: dict) -> AddedToken:
    unknown = set(fields) - set(ADDED_TOKEN_FIELDS) - {"id", "__type"}
    if unknown:
        raise Unsupported(f"added token {fields.get('content')!r} has fields {sorted(unknown)} we do not mirror")
    return AddedToken(**{k: fields[k] for k in ADDED_TOKEN_FIELDS if k in fields})


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as ``tokenizers``' ``BPE.read_file`` reads it: one "a b" pair per line (``\\n`` or ``\\r\\n``),
    ``#version`` lines skipped, any other line an error. Why not ``BPE.from_file``: it parses vocab.json a second
    time (we hold it already) and hands both to the same constructor; this costs ~0.1–0.15 s less CPU."""
    text = path.read_bytes().decode("utf-8")  # not read_text: universal newlines would turn a lone \r into \n
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
    if "#version" in text:
        lines = [line for line in lines if not line.startswith("#version")]
    merges = list(map(tuple, map(methodcaller("split", " "), lines)))
    if set(map(len, merges)) - {2}:
        bad = next(n for n, pair in enumerate(merges, 1) if len(pair) != 2)
        raise Unsupported(f"{path}: merge {bad} is not two tokens separated by one space")
    return merges


def _chat_template(folder: Path, config: dict) -> str | dict | None:
    """transformers' precedence: chat_template.jinja and additional_chat_templates/*.jinja over the config."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, (list, tuple)):
        return {t["name"]: t["template"] for t in value}
    return value


def _post_processor(state: dict) -> Any:
    """A post-processor from its JSON state, via a tokenizer with an empty vocabulary (as transformers does)."""
    shell = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": None, "post_processor": state, "decoder": None,
             "model": {"type": "BPE", "vocab": {}, "merges": []}}
    return Tokenizer.from_str(json.dumps(shell)).post_processor


class LightTokenizer:
    """The slice of the transformers tokenizer API that tokenization uses, with the same results."""

    is_light = True

    def __init__(self, name_or_path: str, config: dict, vocab: dict[str, int], model: BPE,
                 added: dict[int, AddedToken], chat_template: str | dict | None,
                 post_processor: dict | None = None) -> None:
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.model_vocab = vocab  # token → id of the BPE model, without added tokens
        named = {k: _token_text(config[k]) if k in config else QWEN2_DEFAULTS.get(k)
                 for k in SPECIAL_TOKENS_ATTRIBUTES}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # named model-specific tokens (transformers 5 adds them to the special map)
            named.update({k: _token_text(v) for k, v in extra.items()})
            extra = []
        for key, value in config.items():  # custom "*_token" keys are model-specific special tokens too
            if key.endswith("_token") and key not in named and isinstance(value, (str, dict)):
                named[key] = _token_text(value)
        self._named = named
        self.extra_special_tokens = [_token_text(t) for t in extra]

        backend = Tokenizer(model)
        backend.decoder = decoders.ByteLevel()
        if post_processor is not None:  # tokenizer.json's own, as transformers keeps it
            backend.post_processor = _post_processor(post_processor)
        else:  # transformers' update_post_processor() without bos/eos (the config's add_*_token are False)
            if config.get("add_bos_token") or config.get("add_eos_token"):
                raise Unsupported("add_bos_token/add_eos_token set: a post-processor we do not mirror")
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                                   special_tokens=[])
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False),
        ])
        # Added tokens in id order (they take the ids after the BPE vocabulary, as in transformers), then the
        # special tokens the config names but does not list, then Qwen2Tokenizer's own re-add of every special.
        for idx, token in sorted(added.items()):
            backend.add_tokens([token])
            if backend.token_to_id(token.content) != idx:
                raise Unsupported(f"added token {token.content!r} would get id {backend.token_to_id(token.content)}, "
                                  f"the config says {idx}")
        specials = [t for t in [*named.values(), *self.extra_special_tokens] if t is not None]
        present = {t.content for t in added.values()}
        missing = [AddedToken(t, special=True) for t in dict.fromkeys(specials) if t not in present]
        if missing:
            backend.add_tokens(missing)
        backend.add_tokens([AddedToken(t, special=True) for t in dict.fromkeys(specials)])
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.backend_tokenizer = backend
        self._added = backend.get_added_tokens_decoder()
        self._vocab = {**vocab, **{t.content: i for i, t in self._added.items()}}

    # ---- special tokens and vocabulary (transformers' names)
    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in self._named.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_token_id") and name[: -len("_id")] in self.__dict__.get("_named", {}):
            token = self._named[name[: -len("_id")]]
            return None if token is None else self._vocab.get(token)
        if name.endswith("_token") and name in self.__dict__.get("_named", {}):
            return self._named[name]
        raise AttributeError(name)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._added)

    def get_vocab(self) -> dict[str, int]:
        """Token → id, added tokens included (``backend.get_vocab(with_added_tokens=True)`` without the ~0.3 s)."""
        return dict(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.model_vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._vocab.get(tokens)
        return [self._vocab.get(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.backend_tokenizer.decoder.decode(tokens)

    # ---- text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat template
    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """transformers' choice: a named template, ``tool_use`` when tools are given, else ``default``."""
        if isinstance(self.chat_template, dict):
            if chat_template is not None and chat_template in self.chat_template:
                return self.chat_template[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in self.chat_template:
                    return self.chat_template["tool_use"]
                if "default" in self.chat_template:
                    return self.chat_template["default"]
                raise ValueError(f"this tokenizer has several chat templates and no default: "
                                 f"{sorted(self.chat_template)}; pass one by name")
        elif chat_template is None:
            if self.chat_template is None:
                raise ValueError("the tokenizer has no chat template")
            return self.chat_template
        return chat_template

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, **kwargs: Any) -> str:
        """The rendered text of one conversation, as ``apply_chat_template(..., tokenize=False)`` returns it."""
        if tokenize:
            raise ValueError("LightTokenizer.apply_chat_template renders text only: pass tokenize=False and "
                             "encode() the text (one pass, as the data contract says)")
        template = compile_template(self.get_chat_template(chat_template, tools))
        return render(template, conversation, tools=tools, documents=documents,
                      add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})


def load_light(name_or_path: str | os.PathLike, name: str | None = None) -> LightTokenizer:
    """Build the tokenizer of a local directory, or raise Unsupported saying why it must go to transformers.

    ``name`` is the ``name_or_path`` to report (a hub name whose snapshot directory this is); default the path.
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise Unsupported(f"{name_or_path} is not a local directory")
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        raise Unsupported("no tokenizer_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("auto_map"):
        raise Unsupported("the tokenizer ships its own code (auto_map)")
    if config.get("tokenizer_class") not in SUPPORTED_CLASSES:
        raise Unsupported(f"tokenizer_class {config.get('tokenizer_class')!r} is not one of {SUPPORTED_CLASSES}")
    for legacy in ("added_tokens.json", "special_tokens_map.json"):
        if (folder / legacy).exists() and "added_tokens_decoder" not in config:
            raise Unsupported(f"legacy {legacy} without added_tokens_decoder")
    if "fast_tokenizer_files" in config:
        raise Unsupported("versioned tokenizer files (fast_tokenizer_files)")
    added: dict[int, AddedToken] = {}
    post_processor = None
    if (folder / "tokenizer.json").is_file():
        data = orjson.loads((folder / "tokenizer.json").read_bytes())
        model = data.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise Unsupported(f"tokenizer.json holds a {model.get('type')!r} model, not a byte-level BPE")
        vocab = model["vocab"]
        post_processor = data.get("post_processor")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        bpe = BPE(vocab=vocab, merges=merges, **BPE_OPTIONS)
        if "added_tokens_decoder" not in config:  # transformers reads tokenizer.json's list then
            added = {int(t["id"]): _added_token(t) for t in data.get("added_tokens", [])}
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = orjson.loads((folder / "vocab.json").read_bytes())
        bpe = BPE(vocab=vocab, merges=_read_merges(folder / "merges.txt"), **BPE_OPTIONS)
    else:
        raise Unsupported("neither tokenizer.json nor vocab.json + merges.txt")
    if "added_tokens_decoder" in config:
        added = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    return LightTokenizer(name or str(name_or_path), config, vocab, bpe, added, _chat_template(folder, config),
                          post_processor)
