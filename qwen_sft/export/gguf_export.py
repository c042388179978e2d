"""``qwen-sft export-gguf``: a merged qwen3_moe or qwen3_next checkpoint as one GGUF file for llama.cpp / Ollama.

    qwen-sft export-gguf checkpoints/merged_model merged.gguf --type bf16     # or --type q8_0

Written with ``gguf``, llama.cpp's own Python writer, following what llama.cpp's converter
(``convert_hf_to_gguf.py``, ``Qwen3MoeModel`` / ``Qwen2MoeModel``) writes for this architecture:

- metadata under ``qwen3moe.*`` (blocks, context, widths, heads, head_dim, experts, experts used, expert
  width, rope base, RMS eps) and the file type;
- the tokenizer: ``gpt2`` BPE with the ``qwen2`` pre-tokenizer, every id up to ``vocab_size`` (ids the
  tokenizer lacks become ``[PADn]``, unused), added tokens as control / user-defined, merges, special ids
  and the chat template (``gguf.SpecialVocab``);
- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, … ``output``), each layer's experts
  stacked per projection into ``blk.N.ffn_{gate,up,down}_exps`` = ``[E, out, in]`` (ggml ``ne = {in, out, E}``);
  1-D tensors and the router ``ffn_gate_inp`` stay F32, as llama.cpp's converter keeps them.

Streaming: the tensor table is declared from the safetensors headers, then each output tensor is built
(one stacked expert tensor at most) and written before the next is read, so peak memory is one stacked
tensor plus its quantized copy, never the model. The file appears atomically (temporary name, rename).

llama.cpp's qwen3moe graph always renormalizes the top-k router weights and makes every layer sparse, so
a config that says otherwise (``norm_topk_prob: false``, ``mlp_only_layers``, a shared expert) is refused
rather than exported into a model llama.cpp would run differently.

qwen3_next (Qwen3-Coder-Next) is written as llama.cpp's ``qwen3next`` with the same writer: its names,
transforms (norm + 1, -exp(A_log), the in_proj_qkvz split …), extra metadata and refusals live in ``gguf_next.py``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from qwen_sft.export import gguf_next
from qwen_sft.merge.adapter import MergeError
from qwen_sft.model.checkpoint import EXPERTS, expert_key

ARCH = "qwen3moe"
TYPES = ("bf16", "q8_0", "f32")
# llama.cpp identifies a BPE pre-tokenizer by the sha256 of the token ids its check text encodes to
# (get_vocab_base_pre in convert_hf_to_gguf.py). Both Qwen2-family hashes it lists map to "qwen2";
# Qwen3-Coder's tokenizer gives the second (measured here, tests/test_export_gguf.py).
PRE_TOKENIZER_HASHES = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 … Qwen3-Coder
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)
# HF name -> llama.cpp name (gguf.constants.TENSOR_NAMES for MODEL_ARCH.QWEN3MOE); {bid} = layer. The global
# tensors and the attention block are named alike in llama.cpp's qwen3moe and qwen3next.
GLOBAL_NAMES = gguf_next.GLOBAL_NAMES
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    **gguf_next.ATTENTION_NAMES,
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight", "down_proj": "ffn_down_exps.weight"}
QUANT_CHUNK_ROWS = 4096
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", *gguf_next.KEEP_F32)  # as llama.cpp's converter keeps them
MTP_PREFIXES = ("mtp.", "model.mtp.")


class GGUFExportError(MergeError):
    """The checkpoint cannot be exported faithfully; the message says why."""


@dataclass
class OutTensor:
    name: str
    sources: list[str]  # HF keys; several = experts stacked in this order
    shape: tuple[int, ...]  # torch order [E, out, in] / [out, in] / [n]
    qtype: object = None  # gguf.GGMLQuantizationType
    nbytes: int = 0
    transform: Callable | None = None  # [source tensors] -> the tensor to write (qwen3next: norm + 1, qkvz split …)


def _config_problems(cfg: dict) -> list[str]:
    if cfg.get("model_type") == "qwen3_next":
        return gguf_next.config_problems(cfg)  # its own checks: a shared expert is this model's, not a mistake
    problems = []
    if cfg.get("model_type") != "qwen3_moe":
        problems.append(f"model_type={cfg.get('model_type')!r}: export-gguf writes qwen3_moe and qwen3_next (llama.cpp qwen3moe, qwen3next) only")
    if cfg.get("quantization_config"):
        problems.append("the checkpoint is quantized; export the merged 16-bit model")
    if cfg.get("norm_topk_prob") is False:
        problems.append("norm_topk_prob=false: llama.cpp's qwen3moe always renormalizes the top-k router weights")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        problems.append("dense (mlp_only_layers / decoder_sparse_step) layers: llama.cpp's qwen3moe makes every layer MoE")
    if cfg.get("shared_expert_intermediate_size"):
        problems.append("a shared expert: that is qwen2moe, not qwen3moe")
    rope = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or params.get("rope_type")
    if rope_type not in (None, "default", "yarn"):
        problems.append(f"rope type {rope_type!r} is not exported (default and yarn are)")
    return problems


def _rope(cfg: dict) -> tuple[float, dict]:
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    return float(theta if theta is not None else 10000.0), params


def plan_tensors(info: dict[str, tuple[tuple[int, ...], str]], cfg: dict) -> tuple[list[OutTensor], list[str]]:
    """Every checkpoint tensor placed under its llama.cpp name (experts stacked); unplaced ones are problems."""
    n_layers, n_exp = int(cfg["num_hidden_layers"]), int(cfg.get("num_experts", cfg.get("num_local_experts", 0)))
    is_next = cfg.get("model_type") == "qwen3_next"
    out: list[OutTensor] = []
    used: set[str] = set()
    problems = []
    for hf, name in (gguf_next.GLOBAL_NAMES if is_next else GLOBAL_NAMES).items():
        if hf in info:
            out.append(OutTensor(name, [hf], info[hf][0], transform=gguf_next.global_transform(hf) if is_next else None))
            used.add(hf)
        elif not (hf == "lm_head.weight" and cfg.get("tie_word_embeddings")):
            problems.append(f"{hf} is missing")
    linear = gguf_next.layer_is_linear(cfg) if is_next else [False] * n_layers
    for b in range(n_layers):
        pre = f"model.layers.{b}."
        if is_next:  # Gated DeltaNet or gated attention, shared expert: names and transforms in gguf_next
            layer, more, keys = gguf_next.plan_next_layer(
                info, cfg, b, linear[b], lambda name, src, shape, fn: OutTensor(name, src, shape, transform=fn))
            out += layer
            problems += more
            used |= keys
        else:
            for hf_tail, tail in LAYER_NAMES.items():
                hf = pre + hf_tail
                if hf in info:
                    out.append(OutTensor(f"blk.{b}.{tail}", [hf], info[hf][0]))
                    used.add(hf)
                else:
                    problems.append(f"{hf} is missing")
        for proj, tail in EXPERT_NAMES.items():
            keys = [expert_key(pre + EXPERTS, e, proj) for e in range(n_exp)]
            absent = [k for k in keys if k not in info]
            if absent:
                fused = any(k.startswith(f"{pre}{EXPERTS}.") and k.count(".") == 5 for k in info)
                problems.append(f"{absent[0]} is missing ({len(absent)} of {n_exp} experts)"
                                + ("; the experts are stored fused: re-save with transformers >= 5" if fused else ""))
                continue
            shapes = {info[k][0] for k in keys}
            if len(shapes) != 1:
                problems.append(f"{pre}{EXPERTS}.*.{proj}: experts differ in shape {sorted(shapes)}")
                continue
            out.append(OutTensor(f"blk.{b}.{tail}", keys, (n_exp, *shapes.pop())))
            used.update(keys)
    # qwen3_next's multi-token-prediction head: llama.cpp runs without it (its converter's --no-mtp), so it is
    # left out rather than refused; export_gguf notes how many tensors that was.
    extra = sorted(k for k in set(info) - used if not (is_next and k.startswith(MTP_PREFIXES)))
    if extra:
        problems.append(f"{len(extra)} tensors have no llama.cpp {_arch(cfg)} name, e.g. {extra[0]}")
    return out, problems


def _arch(cfg: dict) -> str:
    return gguf_next.ARCH if cfg.get("model_type") == "qwen3_next" else ARCH


def _choose_types(tensors: list[OutTensor], qtype_name: str) -> list[str]:
    """Output type per tensor (llama.cpp's converter rules); returns notes on fallbacks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    notes = []
    for t in tensors:
        if len(t.shape) == 1 or t.name.endswith(KEEP_F32):
            t.qtype = Q.F32
        elif qtype_name == "f32":
            t.qtype = Q.F32
        elif qtype_name == "q8_0":
            block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
            if t.shape[-1] % block:
                t.qtype = Q.BF16
                notes.append(f"{t.name}: row width {t.shape[-1]} is not a multiple of {block}; written as BF16")
            else:
                t.qtype = Q.Q8_0
        else:
            t.qtype = Q.BF16
        t.nbytes = _nbytes(t.shape, t.qtype)
    return notes


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _encode(tensor, qtype):
    """One torch tensor -> the numpy array gguf writes for ``qtype`` (bf16 bits kept exactly when already bf16)."""
    import gguf
    import torch

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return tensor.float().numpy()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).view(torch.uint16).numpy()  # round-to-nearest-even from fp32, as gguf does
    # Quantize in row chunks: numpy's reference quantizer makes several full-size temporaries, which for the
    # embedding would be a few times its fp32 size (measured +128 MiB over the tokenizer for a 37 MiB tensor).
    import numpy as np

    rows = tensor.reshape(-1, tensor.shape[-1])
    row_bytes = _nbytes((tensor.shape[-1],), qtype)
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    for i in range(0, rows.shape[0], QUANT_CHUNK_ROWS):
        out[i:i + QUANT_CHUNK_ROWS] = gguf.quants.quantize(rows[i:i + QUANT_CHUNK_ROWS].float().numpy(), qtype)
    return out.reshape(*tensor.shape[:-1], row_bytes)


def _vocab(tok_dir: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name, as llama.cpp's converter derives them (get_vocab_base)."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZER_HASHES:
        raise GGUFExportError(f"{tok_dir}: the tokenizer's pre-tokenizer is not Qwen2's (check hash {digest[:12]}…); "
                              "llama.cpp would not split text the way this tokenizer does")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"{tok_dir}: tokenizer ids reach {max(vocab.values())}, beyond vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, PRE_TOKENIZER_HASHES[digest]


def export_gguf(merged_dir: str | Path, out_path: str | Path, qtype_name: str = "bf16", progress: bool = True) -> dict:
    """Write ``out_path``; returns a summary (tensors, bytes, notes). All input problems are raised together."""
    import gguf  # noqa: F401  (fail here, before any work, when the package is absent)
    import numpy as np
    import torch
    from tqdm import tqdm

    from qwen_sft.merge.plan import read_base

    if qtype_name not in TYPES:
        raise GGUFExportError(f"--type {qtype_name!r} is not one of {TYPES}")
    base = read_base(merged_dir)  # headers only; refuses pickles, quantized checkpoints, broken shards
    cfg = base.config
    problems = _config_problems(cfg)
    tensors, more = plan_tensors(base.info, cfg) if not problems else ([], [])
    problems += more
    if problems:
        raise GGUFExportError(f"{base.path} cannot be exported as GGUF:\n  - " + "\n  - ".join(problems[:20]))
    notes = _choose_types(tensors, qtype_name)
    mtp = [k for k in base.info if k.startswith(MTP_PREFIXES)] if cfg.get("model_type") == "qwen3_next" else []
    if mtp:
        notes.append(f"the multi-token-prediction head ({len(mtp)} mtp.* tensors) is not exported; llama.cpp runs "
                     "the model without it")
    tokens, toktypes, pre = _vocab(base.path, int(cfg["vocab_size"]))
    shard_of = {k: shard for shard, keys in base.shards.items() for k in keys}
    # Visit output tensors in shard order, so the mapped pages of one shard are read together.
    order = {shard: i for i, shard in enumerate(base.shards)}
    tensors.sort(key=lambda t: (order[shard_of[t.sources[0]]], t.sources[0]))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")  # renamed onto out_path when complete
    try:
        w = gguf.GGUFWriter(path=tmp, arch=_arch(cfg))
        _write_metadata(w, cfg, base.path, qtype_name, tokens, toktypes, pre, notes)
        del tokens, toktypes
        for t in tensors:
            # float32 as the declared dtype makes the writer take our element-count shape as is, for every type
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="gguf", disable=not progress)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many small memory-bound copies (see qwen_sft/merge/stream.py)
        try:
            for t in tensors:
                w.write_tensor_data(_build(base.path, shard_of, t))
                bar.update(t.nbytes)
        finally:
            torch.set_num_threads(threads)
            bar.close()
        w.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out_path), "tensors": len(tensors), "bytes": out_path.stat().st_size, "type": qtype_name,
            "pre_tokenizer": pre, "notes": notes}


def _write_metadata(w, cfg: dict, root: Path, qtype_name: str, tokens, toktypes, pre: str, notes: list[str]) -> None:
    """Architecture keys and the tokenizer, as llama.cpp's converter writes them for Qwen3MoeModel (and, with the
    keys of gguf_next.write_next_metadata, for Qwen3NextModel)."""
    import gguf

    w.add_name(root.name)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    theta, rope = _rope(cfg)
    w.add_rope_freq_base(theta)
    if rope.get("rope_type", rope.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(int(cfg.get("num_experts", cfg.get("num_local_experts"))))
    w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.get("model_type") == "qwen3_next":
        gguf_next.write_next_metadata(w, cfg)
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}
    w.add_file_type(file_type.get(qtype_name, gguf.LlamaFileType.MOSTLY_BF16))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    special = gguf.SpecialVocab(root, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise GGUFExportError(f"{root}: no BPE merges found (merges.txt or tokenizer.json)")
    if not special.chat_template:
        notes.append("no chat template in the tokenizer files; llama.cpp will fall back to its default")
    special.add_to_gguf(w, quiet=True)


def _build(root: Path, shard_of: dict[str, str], t: OutTensor):
    """The encoded data of one output tensor, stacking experts one at a time into the encoded buffer."""
    import numpy as np
    from safetensors import safe_open

    handles: dict[str, object] = {}
    try:
        def get(key):
            shard = shard_of[key]
            if shard not in handles:
                handles[shard] = safe_open(root / shard, framework="pt").__enter__()
            return handles[shard].get_tensor(key)

        if t.transform is not None:
            return _encode(t.transform([get(k) for k in t.sources]), t.qtype)
        if len(t.sources) == 1:
            return _encode(get(t.sources[0]), t.qtype)
        first = _encode(get(t.sources[0]), t.qtype)
        buf = np.empty((len(t.sources), *first.shape), dtype=first.dtype)
        buf[0] = first
        for i, key in enumerate(t.sources[1:], start=1):
            buf[i] = _encode(get(key), t.qtype)
        return buf
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    from qwen_sft.cli_options import parse_or_exit
    from qwen_sft.export.options import gguf_parser

    (a,) = parse_or_exit(gguf_parser(), argv)
    if not re.search(r"\.gguf$", str(a.out)):
        print(f"export-gguf: note: {a.out} does not end in .gguf", file=sys.stderr)
    try:
        r = export_gguf(a.merged_dir, a.out, a.qtype)
    except MergeError as err:
        print(f"export-gguf: error: {err}", file=sys.stderr)
        return 1
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"wrote {r['path']}: {r['tensors']} tensors, {r['bytes'] / 2**20:.1f} MiB, {r['type']}, "
          f"pre-tokenizer {r['pre_tokenizer']}")
    print(f"run: llama-cli -m {r['path']} -cnv   (or: ollama create NAME -f Modelfile with FROM {r['path']})")
    return 0
