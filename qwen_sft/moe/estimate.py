"""GPU memory estimate for QLoRA / LoRA / full fine-tuning, from a model's config.json alone.

    qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json --mode qlora
    qwen-sft estimate ./tiny-qwen3-moe --mode lora --seq 4096 --batch 2 --lora-r 16
    qwen-sft estimate CONFIG --mode full --gpus 8 --zero 3 --offload
    qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/config.json --mode qlora --seq 2048 --trace

Counts every parameter tensor from the config (no weights are read), prices each component in the
storage this project uses (NF4 experts through the expert engine and NF4 attention through
bitsandbytes for qlora; bf16 otherwise; LoRA factors, their gradients and AdamW state in fp32), adds
activations with and without gradient checkpointing and the logits at the loss, and prints the total
per GPU next to the seed README's VRAM table. The formulas are in docs/moe.md.

``--trace`` measures instead of computing: the real training step on fake tensors at the real size
(qwen_sft/trace), printed next to these formulas with the ratio of each row.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from qwen_sft.cli_options import OptionParser, build_parser, option, parse
from qwen_sft.train.args import RunArguments

GiB = 2**30
Mode = Literal["qlora", "lora", "full"]
SEED_TABLE = {"7B": ("~8GB", "~16GB", "~60GB"), "30B-A3B": ("~18GB", "~35GB", "~220GB")}
CUDA_OVERHEAD_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS workspace + allocator slack: an assumption


def nf4_bytes(n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one tensor of ``n`` weights in bitsandbytes NF4 (what NF4Experts.storage_bytes reports)."""
    blocks = math.ceil(n / blocksize)
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * 256


@dataclass
class ModelShape:
    """The sizes the estimate needs, read from a transformers config.json (qwen3_moe, qwen2/3, llama-like)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (used by layers without experts)
    experts: int = 0
    active: int = 0
    moe_intermediate: int = 0
    tied: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    moe_layers: int = 0
    name: str = ""
    # qwen3_next (Qwen3-Coder-Next): Gated DeltaNet layers, gated attention (q_proj doubled), a shared expert
    linear_layers: int = 0
    linear_key_dim: int = 0  # linear_num_key_heads * linear_key_head_dim
    linear_value_dim: int = 0  # linear_num_value_heads * linear_value_head_dim
    linear_value_heads: int = 0
    linear_head_v: int = 0
    linear_conv: int = 0
    attn_gate: bool = False
    shared_intermediate: int = 0

    @property
    def attention_layers(self) -> int:
        return self.layers - self.linear_layers

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {missing}; is this a causal-LM config?")
        heads = cfg["num_attention_heads"]
        # transformers v5 writes num_local_experts (num_experts is an alias); released configs say num_experts
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        layers = cfg["num_hidden_layers"]
        step, only = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if experts and i not in only and (i + 1) % step == 0)
        return cls(vocab=cfg["vocab_size"], hidden=cfg["hidden_size"], layers=layers, heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   intermediate=cfg.get("intermediate_size", 0), experts=experts,
                   active=int(cfg.get("num_experts_per_tok") or 0),
                   moe_intermediate=int(cfg.get("moe_intermediate_size") or 0),
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qk_norm=cfg.get("model_type") in ("qwen3", "qwen3_moe", "qwen3_next") or bool(cfg.get("use_qk_norm")),
                   # Qwen2 / Qwen2.5 always carry q/k/v biases; others say so with attention_bias
                   qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") in ("qwen2", "qwen2_moe"))),
                   moe_layers=moe_layers, name=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
                   **_next_fields(cfg))


def _next_fields(cfg: dict) -> dict:
    """qwen3_next's extra sizes (Qwen3NextConfig field names); empty for every other model type."""
    if cfg.get("model_type") != "qwen3_next":
        return {}
    layers = cfg["num_hidden_layers"]
    kinds = cfg.get("layer_types") or ["linear_attention" if (i + 1) % int(cfg.get("full_attention_interval", 4))
                                       else "full_attention" for i in range(layers)]
    vh, hv = int(cfg.get("linear_num_value_heads", 32)), int(cfg.get("linear_value_head_dim", 128))
    return {"linear_layers": kinds.count("linear_attention"), "attn_gate": True,
            "linear_key_dim": int(cfg.get("linear_num_key_heads", 16)) * int(cfg.get("linear_key_head_dim", 128)),
            "linear_value_dim": vh * hv, "linear_value_heads": vh, "linear_head_v": hv,
            "linear_conv": int(cfg.get("linear_conv_kernel_dim", 4)),
            "shared_intermediate": int(cfg.get("shared_expert_intermediate_size") or 0)}


def parameter_groups(m: ModelShape) -> dict[str, list[int]]:
    """Component -> sizes of its individual weight tensors (so NF4 scales are priced per tensor, as stored)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    dense_layers = m.layers - m.moe_layers
    q_out = 2 * q if m.attn_gate else q  # gated attention: q_proj also emits the output gate
    attn = [m.hidden * q_out, m.hidden * kv, m.hidden * kv, q * m.hidden] * m.attention_layers
    k, v, vh = m.linear_key_dim, m.linear_value_dim, m.linear_value_heads
    # Gated DeltaNet: in_proj_qkvz, in_proj_ba, out_proj (Linears); depthwise conv, A_log, dt_bias, gated norm
    linear = [m.hidden * (2 * k + 2 * v), m.hidden * 2 * vh, v * m.hidden] * m.linear_layers
    linear_small = [(2 * k + v) * m.linear_conv, vh, vh, m.linear_head_v] * m.linear_layers
    shared = [m.hidden * m.shared_intermediate] * 3 * (m.moe_layers if m.shared_intermediate else 0)
    groups = {
        "embeddings": [m.vocab * m.hidden],
        "lm_head": [] if m.tied else [m.vocab * m.hidden],
        "attention (q/k/v/o)": attn,
        "linear attention (Gated DeltaNet)": linear,
        "norms + routers": [2 * m.hidden] * m.layers + [m.hidden]
        + ([2 * m.head_dim] * m.attention_layers if m.qk_norm else [])
        + [m.experts * m.hidden] * m.moe_layers + ([q + 2 * kv] * m.layers if m.qkv_bias else []) + linear_small
        + ([m.hidden] * m.moe_layers if m.shared_intermediate else []),  # the shared expert's 1-row sigmoid gate
        "shared expert": shared,
        "dense MLP": [m.hidden * m.intermediate] * 3 * dense_layers,
        # The expert engine stores each layer's fused gate_up [E, 2I, H] and down [E, H, I] as one tensor each.
        "routed experts": [m.experts * 2 * m.moe_intermediate * m.hidden, m.experts * m.hidden * m.moe_intermediate]
        * m.moe_layers,
    }
    return {k: v for k, v in groups.items() if v}


def lora_params(m: ModelShape, r: int, experts: bool = True) -> int:
    """LoRA on q/k/v/o (+ gate/up/down of dense MLPs) and, with the engine, per-expert rank-r factors."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    q_out = 2 * q if m.attn_gate else q
    n = m.attention_layers * r * ((m.hidden + q_out) + 2 * (m.hidden + kv) + (q + m.hidden))
    n += (m.layers - m.moe_layers) * r * (2 * (m.hidden + m.intermediate) + (m.intermediate + m.hidden))
    # qwen3_next: Gated DeltaNet in_proj_qkvz, in_proj_ba, out_proj; the shared expert's gate/up/down
    k, v = m.linear_key_dim, m.linear_value_dim
    n += m.linear_layers * r * ((m.hidden + 2 * k + 2 * v) + (m.hidden + 2 * m.linear_value_heads) + (v + m.hidden))
    if m.shared_intermediate:
        n += m.moe_layers * r * (2 * (m.hidden + m.shared_intermediate) + (m.shared_intermediate + m.hidden))
    if experts:
        n += m.moe_layers * m.experts * r * ((m.hidden + 2 * m.moe_intermediate) + (m.moe_intermediate + m.hidden))
    return n


@dataclass
class Options:
    """What is estimated; each field's help is the CLI help of ``qwen-sft estimate``."""

    mode: Mode = option("qlora", "--mode", help="qlora (NF4 base + LoRA), lora (bf16 base + LoRA) or full fine-tuning")
    seq: int = option(2048, "--seq", help="tokens per sequence")
    batch: int = option(1, "--batch", help="sequences per GPU per step")
    lora_r: int = option(8, "--lora-r", help="LoRA rank (per expert for the experts)")
    gpus: int = option(1, "--gpus", help="data-parallel GPUs (what ZeRO shards over)")
    zero: Literal[2, 3] | None = option(None, "--zero", help="DeepSpeed ZeRO stage")
    offload: bool = option(False, "--offload", help="ZeRO CPU offload of optimizer (and params at stage 3)")
    double_quant: bool = option(True, negate=("--no-double-quant",), help="NF4 scales in fp32 instead of 8-bit")
    expert_lora: bool = option(True, negate=("--no-expert-lora",), help="LoRA on attention only")
    optim: Literal["adamw", "adamw8bit"] = option("adamw", "--optim", help=(
        "optimizer of the LoRA modes (adamw8bit: bitsandbytes 8-bit AdamW state)"))

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("qlora", "lora", "full"):
            problems.append(f"--mode must be qlora, lora or full, got {self.mode!r}")
        for name in ("seq", "batch", "lora_r", "gpus"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.zero not in (None, 2, 3):
            problems.append(f"--zero must be 2 or 3, got {self.zero}")
        if self.optim not in ("adamw", "adamw8bit"):
            problems.append(f"--optim must be adamw or adamw8bit, got {self.optim!r}")
        if self.offload and self.zero is None:
            problems.append("--offload needs --zero 2 or 3 (DeepSpeed does the offloading)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Estimate:
    rows: list[tuple[str, int, str, int]] = field(default_factory=list)  # (component, params, storage, bytes/GPU)
    params_total: int = 0
    params_experts: int = 0
    params_active: int = 0
    activations_ckpt: int = 0  # checkpointed layer inputs + one layer recomputed
    activations_full: int = 0
    activations_inputs: int = 0  # the checkpointed layer inputs alone (live at the loss)
    logits: int = 0
    dequant_chunk: int = 0  # the engine's transient bf16 weights of one chunk of experts (qlora)

    @property
    def static_bytes(self) -> int:
        return sum(r[3] for r in self.rows)

    flops: int = 0  # per optimizer step, forward + backward (+ recomputation), causal attention counted once

    def peak(self, checkpointing: bool) -> int:
        """Peak allocated: the larger of the two moments the trace finds. At the start of backward the loss holds
        its logits and their gradients beside every saved activation; later, one layer is recomputed (its full
        activations) and the engine holds a dequantized chunk, while the logits are gone."""
        if not checkpointing:
            return self.static_bytes + self.activations_full + self.logits
        at_loss = self.activations_inputs + self.logits
        in_layer = self.activations_ckpt + self.dequant_chunk
        return self.static_bytes + max(at_loss, in_layer)

    def total(self, checkpointing: bool) -> int:
        return self.peak(checkpointing) + CUDA_OVERHEAD_BYTES


def activation_bytes(m: ModelShape, o: Options) -> tuple[int, int, int]:
    """(with checkpointing, without, layer inputs alone) bf16 activation bytes kept for backward."""
    tokens = o.seq * o.batch
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    # attention: norm in/out, q/k/v before and after norm+rope, attention out + its input to o_proj, residual
    attn = 4 * m.hidden + 3 * q + 4 * kv
    # routed experts (engine): routed inputs K*H, pre-activations K*2I, r-wide LoRA intermediates; router fp32
    moe = m.active * (m.hidden + 2 * m.moe_intermediate + 2 * o.lora_r) + 4 * m.experts
    dense = 4 * m.intermediate
    if m.attn_gate:
        attn += 2 * q  # gated attention: the gate half of q_proj and the gated output
    # qwen3_next Gated DeltaNet (a formula, like the rest; the fake-tensor trace measures): norm in/out,
    # qkvz + ba projections, conv output, the fp32 q/k/v copies of the chunked delta rule, gated norm + out_proj
    k, v = m.linear_key_dim, m.linear_value_dim
    linear = 4 * m.hidden + (2 * k + 2 * v) + 2 * m.linear_value_heads + (2 * k + v) + 2 * (2 * k + v) + 3 * v
    moe += 3 * m.shared_intermediate  # shared expert: gate, up pre-activations and their product
    per_layer = [(linear if i < m.linear_layers else attn) + (moe if i < m.moe_layers else dense)
                 for i in range(m.layers)]
    full = 2 * tokens * sum(per_layer)
    # checkpointing keeps each layer's input, and recomputes one layer at a time (its full set, transiently)
    inputs = 2 * tokens * m.layers * m.hidden
    ckpt = inputs + 2 * tokens * max(per_layer)
    return ckpt, full, inputs


def step_flops(m: ModelShape, o: Options, checkpointing: bool = True) -> int:
    """FLOPs of one optimizer step: matmuls at 2 per multiply-add; a frozen weight costs forward + input gradient
    (2x forward), a trained one 3x; checkpointing recomputes each layer's forward; causal attention is half of
    the full S x S product, its backward 2.5x its forward (flash attention's five matmuls)."""
    t = o.seq * o.batch
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    attn_w = m.hidden * (q + 2 * kv) + q * m.hidden
    mlp_w = [m.active * 3 * m.moe_intermediate * m.hidden + m.experts * m.hidden if i < m.moe_layers
             else 3 * m.hidden * m.intermediate for i in range(m.layers)]
    layer_fwd = sum(2 * t * (attn_w + w) for w in mlp_w)
    attn_fwd = m.layers * 2 * o.seq * o.seq * o.batch * q  # QK^T and PV, causal half: 2 * (2 S^2 d / 2)
    head_fwd = 2 * t * m.hidden * m.vocab
    recompute = 1 if checkpointing else 0
    if o.mode == "full":
        matmul = layer_fwd * (3 + recompute) + head_fwd * 3
    else:
        matmul = layer_fwd * (2 + recompute) + head_fwd * 2
        r = o.lora_r
        lora_tok = m.layers * r * ((m.hidden + q) + 2 * (m.hidden + kv) + (q + m.hidden))
        if o.expert_lora and m.experts:
            lora_tok += m.moe_layers * m.active * r * (m.hidden + 2 * m.moe_intermediate + m.moe_intermediate
                                                       + m.hidden)
        matmul += 2 * t * lora_tok * (3 + recompute)
    return matmul + int(attn_fwd * (1 + recompute + 2.5))


def estimate(m: ModelShape, o: Options) -> Estimate:
    est = Estimate()
    groups = parameter_groups(m)
    est.params_total = sum(sum(v) for v in groups.values())
    est.params_experts = sum(groups.get("routed experts", []))
    est.params_active = est.params_total - est.params_experts + est.params_experts * m.active // max(m.experts, 1)
    shard_w = o.gpus if o.zero == 3 else 1
    for name, sizes in groups.items():
        nf4 = o.mode == "qlora" and name in ("attention (q/k/v/o)", "dense MLP", "routed experts",
                                             "linear attention (Gated DeltaNet)", "shared expert")
        b = sum(nf4_bytes(n, double_quant=o.double_quant) for n in sizes) if nf4 else 2 * sum(sizes)
        if o.offload and o.zero == 3:
            b = 0  # parameters live in CPU memory, fetched layer by layer
        est.rows.append((f"weights: {name}", sum(sizes), "nf4" if nf4 else "bf16", math.ceil(b / shard_w)))
    shard_opt = o.gpus if o.zero in (2, 3) else 1
    if o.mode == "full":
        trainable, weight_bytes = est.params_total, 2  # bf16 gradients; fp32 master + AdamW m, v = 12 bytes
        master_opt = 12
    else:
        trainable = lora_params(m, o.lora_r, experts=o.expert_lora and m.experts > 0)
        est.rows.append(("LoRA parameters", trainable, "fp32", math.ceil(4 * trainable / shard_w)))
        # fp32 gradients; AdamW m, v in fp32, or one byte each with bitsandbytes' 8-bit AdamW
        weight_bytes, master_opt = 4, (2 if o.optim == "adamw8bit" else 8)
    est.rows.append(("gradients", trainable, "bf16" if o.mode == "full" else "fp32",
                     math.ceil(weight_bytes * trainable / shard_opt)))
    opt_bytes = 0 if o.offload else math.ceil(master_opt * trainable / shard_opt)
    opt_name = "optimizer state (" + ("AdamW, fp32 master)" if o.mode == "full" else f"{o.optim})")
    est.rows.append((opt_name, trainable, "cpu" if o.offload else ("int8" if o.optim == "adamw8bit" else "fp32"),
                     opt_bytes))
    est.activations_ckpt, est.activations_full, est.activations_inputs = activation_bytes(m, o)
    # At the start of backward, in transformers' loss: 12 bytes per logit, as the trace measures (fp32 logits
    # 4, their log-softmax gradient 4, its fp32 copy 4; the bf16 logits are released by then).
    est.logits = o.seq * o.batch * m.vocab * 12
    est.flops = step_flops(m, o)
    if o.mode == "qlora" and m.moe_layers:
        # ExpertEngine dequantizes at most chunk_experts (32) experts' gate_up + down at a time, in bf16.
        est.dequant_chunk = 2 * min(32, m.experts) * 3 * m.moe_intermediate * m.hidden
    return est


def load_config(path: str) -> tuple[dict, Path]:
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json there; pass a model directory or a config.json path")
    return json.loads(cfg_path.read_text(encoding="utf-8")), cfg_path


def _gib(b: int) -> str:
    return f"{b / GiB:8.2f}"


def render(m: ModelShape, o: Options, est: Estimate, source: str) -> str:
    pct = 100 * est.params_experts / max(est.params_total, 1)
    zero = f"ZeRO-{o.zero}" if o.zero else "no ZeRO"
    lines = [
        f"model: {m.name} from {source}",
        f"parameters: {est.params_total:,} total ({est.params_total / 1e9:.2f} B); routed experts "
        f"{est.params_experts:,} ({est.params_experts / 1e9:.2f} B, {pct:.1f} %); active per token "
        f"{est.params_active / 1e9:.2f} B",
        f"mode {o.mode}, seq {o.seq}, batch {o.batch}, lora r {o.lora_r}, optim {o.optim}, gpus {o.gpus}, {zero}, "
        f"offload {'yes' if o.offload else 'no'}",
        "",
        f"{'component':<44}{'params':>16}  {'storage':<8}{'GiB/GPU':>9}",
    ]
    lines += [f"{name:<44}{n:>16,}  {kind:<8}{_gib(b):>9}" for name, n, kind, b in est.rows]
    lines += [
        f"{'activations, gradient checkpointing':<44}{'':>16}  {'bf16':<8}{_gib(est.activations_ckpt):>9}",
        f"{'activations, no checkpointing':<44}{'':>16}  {'bf16':<8}{_gib(est.activations_full):>9}",
        f"{'logits at the loss (12 bytes per logit)':<44}{'':>16}  {'':<8}{_gib(est.logits):>9}",
        f"{'dequantized expert chunk (transient)':<44}{'':>16}  {'bf16':<8}{_gib(est.dequant_chunk):>9}",
        f"{'CUDA context + workspace (assumed)':<44}{'':>16}  {'':<8}{_gib(CUDA_OVERHEAD_BYTES):>9}",
        "",
        f"total per GPU with gradient checkpointing: {est.total(True) / GiB:.2f} GiB "
        f"({est.total(True) / 1e9:.1f} GB)",
        f"total per GPU without checkpointing:      {est.total(False) / GiB:.2f} GiB "
        f"({est.total(False) / 1e9:.1f} GB)",
        f"FLOPs per optimizer step (checkpointing): {est.flops / 1e12:.1f} TFLOP, "
        f"{est.flops / (o.seq * o.batch) / 1e9:.2f} GFLOP per token",
        "",
        "seed README VRAM table (QLoRA | LoRA | Full FT):",
    ]
    lines += [f"  {k:<8} {' | '.join(v)}" for k, v in SEED_TABLE.items()]
    return "\n".join(lines)


TRACE_GROUP = "--trace: measure one training step on fake tensors (qwen_sft/trace)"
_RUN_DEFAULTS = {f.name: f.default for f in fields(RunArguments)}


@dataclass
class EstimateInput:
    model: str = option(help="model directory or config.json", metavar="MODEL_OR_CONFIG")


@dataclass
class TraceOptions:
    """``--trace`` and how the traced step runs (the arguments of qwen_sft.trace.cli.trace_estimate)."""

    trace: bool = option(False, "--trace", group=TRACE_GROUP,
                         help="trace the real training step; nothing is allocated")
    routing: Literal["uniform", "skewed"] = option("uniform", "--routing", group=TRACE_GROUP, help=(
        "tokens to experts: uniform, or skewed (every token to the same top-k experts)"))
    layers: Literal["fit", "all"] = option("fit", "--layers", group=TRACE_GROUP, help=(
        "fit: trace 2 and 4 layers and extrapolate linearly (fast, tested equal); all: every layer"))
    checkpointing: bool = option(True, negate=("--no-checkpointing",), group=TRACE_GROUP,
                                 help="trace without gradient checkpointing")
    accumulating: bool = option(True, negate=("--first-micro-step",), group=TRACE_GROUP,
                                help="no gradients from an earlier micro-batch (gradient_accumulation_steps 1)")
    gpu_memory: str | None = option(None, "--gpu-memory", group=TRACE_GROUP,
                                    help="fail unless the traced total fits, e.g. 24GB or 80GiB")
    loss: Literal["chunked", "full"] = option(
        "chunked" if _RUN_DEFAULTS["chunked_loss"] else "full", "--loss", group=TRACE_GROUP, help="the step's loss: training's chunked cross-entropy (chunked_loss, the run's default) or transformers' "
             "loss over the full fp32 logits (chunked_loss false)")
    loss_chunk_tokens: int = option(_RUN_DEFAULTS["loss_chunk_tokens"], "--loss-chunk-tokens", group=TRACE_GROUP, help=(
        "tokens per lm_head chunk of the chunked loss (loss_chunk_tokens; the run's default)"))
    offload_activations: bool = option(False, "--offload-activations", group=TRACE_GROUP, help=(
        "what autograd keeps outside the checkpointed layers goes to the host (offload_activations)"))

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens < 1:
            raise ValueError(f"--loss-chunk-tokens must be >= 1, got {self.loss_chunk_tokens}")


def estimate_parser() -> OptionParser:
    return build_parser("qwen-sft estimate", [EstimateInput, Options, TraceOptions],
                        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example: qwen-sft estimate ../shared/spec/qwen3-coder-30b-a3b-instruct/"
                               "config.json --mode qlora --seq 2048")


def main(argv: list[str] | None = None) -> int:
    parser = estimate_parser()
    (source, opts, trace), problems = parse(parser, argv)
    try:  # the config's problems are reported with the options' (argparse's form: usage, then every problem)
        cfg, cfg_path = load_config(source.model)
        shape = ModelShape.from_config(cfg)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        problems.append(str(e))
    if problems:
        parser.error("\n  ".join(problems))
    if not trace.trace:
        print(render(shape, opts, estimate(shape, opts), str(cfg_path)))
        return 0
    from qwen_sft.trace.cli import trace_estimate
    from qwen_sft.trace.step import chunked_loss, offloaded

    loss_fn = chunked_loss(trace.loss_chunk_tokens) if trace.loss == "chunked" else None
    loss_line = f", chunked loss of {trace.loss_chunk_tokens} tokens" if loss_fn else ", full-logits loss"
    if trace.offload_activations:
        loss_fn, loss_line = offloaded(loss_fn), loss_line + ", offload_activations"
    return trace_estimate(cfg_path, shape, opts, estimate(shape, opts), routing=trace.routing, layers=trace.layers,
                          checkpointing=trace.checkpointing, accumulating=trace.accumulating,
                          gpu_memory=trace.gpu_memory, loss_fn=loss_fn, loss_line=loss_line)
