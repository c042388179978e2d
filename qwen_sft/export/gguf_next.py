"""The qwen3_next (Qwen3-Coder-Next) half of ``qwen-sft export-gguf``: llama.cpp's ``qwen3next`` names, transforms
and metadata, on top of the streaming writer in ``gguf_export.py``.

    qwen-sft export-gguf checkpoints/merged_model next.gguf --type bf16

What llama.cpp's converter (``Qwen3NextModel`` in convert_hf_to_gguf.py / conversion/qwen.py) does to a
``Qwen3NextForCausalLM`` checkpoint, and what its loader (src/models/qwen3next.cpp) then expects:

- every zero-centred RMSNorm weight (``input_layernorm``, ``post_attention_layernorm``, ``q_norm``, ``k_norm``,
  ``model.norm``) is stored as ``1 + w``: transformers computes ``x̂ · (1 + w)``, llama.cpp ``x̂ · w``. The gated
  norm of the Gated DeltaNet (``linear_attn.norm``) multiplies by ``w`` itself and is copied;
- ``A_log`` becomes ``ssm_a = -exp(A_log)`` (llama.cpp multiplies softplus(a + dt_bias) by it directly);
  ``dt_bias`` becomes ``ssm_dt.bias``; ``conv1d.weight`` ``[C, 1, K]`` is squeezed to ``[C, K]``;
- ``in_proj_qkvz`` (rows grouped per key head as ``[q, k, v, z]``) is split into ``attn_qkv`` (all q, then all k,
  then all v: the channel order the causal conv and ``ssm_conv1d`` use) and ``attn_gate`` (z);
  ``in_proj_ba`` keeps its per-key-head ``[b, a]`` grouping (llama.cpp splits it the same way) as ``ssm_ba``;
- the gated attention's ``q_proj`` (query and gate interleaved per head) is copied: llama.cpp splits it per head;
- the shared expert is ``ffn_{gate,up,down}_shexp`` and its sigmoid gate ``ffn_gate_inp_shexp`` (kept F32 with
  the router, ``ssm_conv1d``, ``ssm_a`` and ``ssm_dt.bias``);
- the multi-token-prediction head (``mtp.*``) is left out: llama.cpp runs the model without it.
"""

from __future__ import annotations

from collections.abc import Callable

ARCH = "qwen3next"
# Global and per-layer HF tail -> llama.cpp name (gguf.constants.TENSOR_NAMES for MODEL_ARCH.QWEN3NEXT).
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
COMMON_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
ATTENTION_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
LINEAR_NAMES = {  # in_proj_qkvz is split (two names) in plan_next_layer
    "linear_attn.in_proj_ba.weight": "ssm_ba.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
}
# Zero-centred RMSNorm weights (Qwen3NextRMSNorm: x̂ · (1 + w)); not linear_attn.norm (Qwen3NextRMSNormGated).
PLUS_ONE = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
            "self_attn.k_norm.weight")
KEEP_F32 = ("ffn_gate_inp_shexp.weight", "ssm_conv1d.weight", ".ssm_a", ".bias")


def layer_is_linear(cfg: dict) -> list[bool]:
    """Per layer: Gated DeltaNet (True) or full attention, from ``layer_types`` or, as transformers derives it,
    every ``full_attention_interval``-th layer full."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types:
        return [t == "linear_attention" for t in types]
    interval = int(cfg.get("full_attention_interval", 4))
    return [(i + 1) % interval != 0 for i in range(n)]


def config_problems(cfg: dict) -> list[str]:
    """What llama.cpp's qwen3next graph cannot run as transformers does; each names the setting."""
    problems = []
    if cfg.get("quantization_config"):
        problems.append("the checkpoint is quantized; export the merged 16-bit model")
    n = int(cfg.get("num_hidden_layers", 0))
    types = cfg.get("layer_types")
    if types is not None and (len(types) != n or set(types) - {"linear_attention", "full_attention"}):
        problems.append(f"layer_types {types!r}: expected {n} entries of linear_attention / full_attention")
    if cfg.get("norm_topk_prob") is False:
        problems.append("norm_topk_prob=false: llama.cpp's qwen3next always renormalizes the top-k router weights")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        problems.append("dense (mlp_only_layers / decoder_sparse_step) layers: llama.cpp's qwen3next makes every "
                        "layer MoE")
    if not cfg.get("shared_expert_intermediate_size"):
        problems.append("no shared expert (shared_expert_intermediate_size): llama.cpp's qwen3next requires one")
    dk, dv = cfg.get("linear_key_head_dim"), cfg.get("linear_value_head_dim")
    if dk != dv:
        problems.append(f"linear_key_head_dim={dk} != linear_value_head_dim={dv}: llama.cpp's qwen3next uses one "
                        "head width (ssm.state_size) for both")
    nk, nv = cfg.get("linear_num_key_heads") or 0, cfg.get("linear_num_value_heads") or 0
    if not nk or nv % nk:
        problems.append(f"linear_num_value_heads={nv} is not a multiple of linear_num_key_heads={nk}")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=true: the qwen3next mapping has no attention biases")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.get('hidden_act')!r}: llama.cpp's qwen3next uses silu")
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type not in (None, "default", "yarn"):
        problems.append(f"rope type {rope_type!r} is not exported (default and yarn are)")
    return problems


def _plus_one(ts):
    return ts[0].float() + 1.0


def _neg_exp(ts):
    return -ts[0].float().exp()


def _squeeze_conv(ts):
    w = ts[0]
    return w.reshape(w.shape[0], w.shape[-1])  # [C, 1, K] -> [C, K]


def qkvz_split(cfg: dict) -> tuple[Callable, Callable]:
    """Two transforms of ``in_proj_qkvz.weight``: its ``attn_qkv`` rows and its ``attn_gate`` (z) rows."""
    nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    dk, dv = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
    vk = nv // nk * dv  # value (and z) rows per key head

    def parts(w):
        q, k, v, z = w.reshape(nk, 2 * dk + 2 * vk, w.shape[-1]).split([dk, dk, vk, vk], dim=1)
        return [p.reshape(-1, w.shape[-1]) for p in (q, k, v, z)]

    def qkv(ts):
        import torch

        return torch.cat(parts(ts[0])[:3], dim=0)

    def gate(ts):
        return parts(ts[0])[3].contiguous()

    return qkv, gate


def plan_next_layer(info: dict, cfg: dict, b: int, linear: bool, out_tensor) -> tuple[list, list[str], set[str]]:
    """Layer ``b``'s non-expert tensors as ``out_tensor(name, sources, shape, transform)``; returns (tensors,
    problems, used HF keys)."""
    pre = f"model.layers.{b}."
    out, problems, used = [], [], set()
    names = {**COMMON_NAMES, **(LINEAR_NAMES if linear else ATTENTION_NAMES)}
    for hf_tail, tail in names.items():
        hf = pre + hf_tail
        if hf not in info:
            problems.append(f"{hf} is missing ({'Gated DeltaNet' if linear else 'full attention'} layer)")
            continue
        shape, transform = tuple(info[hf][0]), None
        if hf_tail in PLUS_ONE:
            transform = _plus_one
        elif hf_tail == "linear_attn.A_log":
            transform = _neg_exp
        elif hf_tail == "linear_attn.conv1d.weight":
            shape, transform = (shape[0], shape[-1]), _squeeze_conv
        out.append(out_tensor(f"blk.{b}.{tail}", [hf], shape, transform))
        used.add(hf)
    if linear:
        hf = pre + "linear_attn.in_proj_qkvz.weight"
        if hf not in info:
            problems.append(f"{hf} is missing (Gated DeltaNet layer)")
        else:
            nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
            key_dim, value_dim = nk * int(cfg["linear_key_head_dim"]), nv * int(cfg["linear_value_head_dim"])
            rows, width = info[hf][0]
            if rows != 2 * key_dim + 2 * value_dim:
                problems.append(f"{hf}: {rows} rows, expected 2·{key_dim} + 2·{value_dim} from the config")
            else:
                qkv, gate = qkvz_split(cfg)
                out.append(out_tensor(f"blk.{b}.attn_qkv.weight", [hf], (2 * key_dim + value_dim, width), qkv))
                out.append(out_tensor(f"blk.{b}.attn_gate.weight", [hf], (value_dim, width), gate))
            used.add(hf)
    return out, problems, used


def global_transform(hf: str):
    return _plus_one if hf == "model.norm.weight" else None


def write_next_metadata(w, cfg: dict) -> None:
    """The qwen3next keys beyond those it shares with qwen3moe (written by gguf_export._write_metadata)."""
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
    w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))
    w.add_ssm_conv_kernel(int(cfg["linear_conv_kernel_dim"]))
    w.add_ssm_state_size(int(cfg["linear_key_head_dim"]))
    w.add_ssm_group_count(int(cfg["linear_num_key_heads"]))
    w.add_ssm_time_step_rank(int(cfg["linear_num_value_heads"]))
    w.add_ssm_inner_size(int(cfg["linear_value_head_dim"]) * int(cfg["linear_num_value_heads"]))
    # The explicit per-layer flags (llama.cpp reads them before falling back to the interval); written by key
    # because older gguf writers have no add_recurrent_layers.
    linear = layer_is_linear(cfg)
    w.add_array(f"{ARCH}.attention.recurrent_layers", linear)
    # transformers v5 saves layer_types and drops full_attention_interval; the interval is written when the layer
    # types follow one (llama.cpp's fallback when the flags are absent), never a default that contradicts them.
    interval = cfg.get("full_attention_interval") or (linear.index(False) + 1 if False in linear else None)
    if interval and linear == [(i + 1) % interval != 0 for i in range(len(linear))]:
        w.add_full_attention_interval(int(interval))
    w.add_rope_dimension_count(int(head_dim * partial))
