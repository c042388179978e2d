"""A loadable Qwen3-MoE model directory with the Qwen3-Coder architecture scaled down.

    qwen-sft make-tiny-model ./tiny-qwen3-moe --layers 2 --hidden 64 --experts 8 --active 2
    qwen-sft make-tiny-model ./tiny-qwen3-next --model_type qwen3_next   # 4 layers (both kinds), 16 experts, top-10

Same module layout, vocabulary (151,936 embedding rows) and tokenizer as
Qwen3-Coder-30B-A3B-Instruct; only the sizes shrink. Weights are random (seeded), so the
directory is a stand-in for the real model in tests, the demo and CPU dry runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from qwen_sft.atomic import atomic_dir
from qwen_sft.cli_options import OptionParser, build_parser, option, parse_or_exit

VOCAB_ROWS = 151_936


@dataclass
class TinySpec:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    experts: int = 8
    active: int = 2
    moe_intermediate: int = 32
    max_positions: int = 4096
    seed: int = 0
    # qwen3_next (Qwen3-Coder-Next) only: a Gated DeltaNet layer everywhere except every
    # ``full_attention_interval``-th layer (gated full attention), and a sigmoid-gated shared expert.
    model_type: str = "qwen3_moe"
    full_attention_interval: int = 2
    shared_intermediate: int = 32
    linear_key_heads: int = 2
    linear_value_heads: int = 4
    linear_head_dim: int = 16


ModelType = Literal["qwen3_moe", "qwen3_next"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
# Sizes that make the default tiny qwen3_next cover what the real one has: both layer kinds twice,
# 16 experts with 10 active (the real top-k), a shared expert.
NEXT_DEFAULTS = {"layers": 4, "experts": 16, "active": 10}


def tiny_config(spec: TinySpec):
    """The tiny model's config: ``Qwen3MoeConfig`` or, for ``model_type="qwen3_next"``, ``Qwen3NextConfig``."""
    if spec.model_type == "qwen3_next":
        return tiny_next_config(spec)
    if spec.model_type != "qwen3_moe":
        raise ValueError(f"tiny model_type must be one of {MODEL_TYPES}, got {spec.model_type!r}")
    return tiny_moe_config(spec)


def _shared_config(spec: TinySpec) -> dict:
    """What both tiny architectures share: the real vocabulary and special ids, top-k MoE in every layer, bf16."""
    return dict(
        vocab_size=VOCAB_ROWS, hidden_size=spec.hidden, intermediate_size=spec.moe_intermediate * 2,
        moe_intermediate_size=spec.moe_intermediate, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, num_experts=spec.experts,
        num_experts_per_tok=spec.active, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=spec.max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
        router_aux_loss_coef=0.0, output_router_logits=False, bos_token_id=None, eos_token_id=151645,
        pad_token_id=151643, use_cache=True, dtype="bfloat16",
    )


def tiny_next_config(spec: TinySpec):
    """A ``Qwen3NextConfig`` with Qwen3-Coder-Next's structure: hybrid Gated DeltaNet / gated attention
    (partial rotary 0.25), MoE in every layer with a shared expert, untied embeddings, no MTP head."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **_shared_config(spec),
        shared_expert_intermediate_size=spec.shared_intermediate,
        linear_num_key_heads=spec.linear_key_heads,
        linear_num_value_heads=spec.linear_value_heads,
        linear_key_head_dim=spec.linear_head_dim,
        linear_value_head_dim=spec.linear_head_dim,
        linear_conv_kernel_dim=4,
        full_attention_interval=spec.full_attention_interval,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.25},
    )


def tiny_moe_config(spec: TinySpec):
    """A ``Qwen3MoeConfig`` with Qwen3-Coder's structure (qk-norm, untied embeddings, no shared expert)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_shared_config(spec),
        rope_theta=10_000_000.0,
    )


def build_tiny_model(spec: TinySpec):
    """Instantiate the tiny model with seeded random weights (fp32 in memory)."""
    import torch
    from transformers import Qwen3MoeForCausalLM, Qwen3NextForCausalLM

    torch.manual_seed(spec.seed)
    cls = Qwen3NextForCausalLM if spec.model_type == "qwen3_next" else Qwen3MoeForCausalLM
    model = cls(tiny_config(spec))
    # Routers start at zero in transformers' init; give them random weights so routing is non-trivial.
    # The shared-expert gate too, so a test that drops or mis-gates the shared expert changes the logits.
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "weight"):
                gate.weight.normal_(0.0, 0.5)
            shared_gate = getattr(layer.mlp, "shared_expert_gate", None)
            if shared_gate is not None:
                shared_gate.weight.normal_(0.0, 0.5)
    return model


def make_tiny_model(out_dir: str | os.PathLike, spec: TinySpec | None = None, tokenizer: str | None = None,
                    dtype: str = "bfloat16") -> Path:
    """Write config, safetensors weights, generation config and the tokenizer into ``out_dir``."""
    import torch
    from transformers import GenerationConfig

    from qwen_sft.tokenizer import load_tokenizer, offline_tokenizer_dir

    spec = spec or TinySpec()
    model = build_tiny_model(spec).to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        GenerationConfig(
            pad_token_id=151643, eos_token_id=[151645, 151643], do_sample=False
        ).save_pretrained(tmp)
        if tokenizer is None:
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                shutil.copy(offline_tokenizer_dir() / name, tmp / name)
        else:
            load_tokenizer(tokenizer).save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(spec.__dict__, indent=2), encoding="utf-8")
    return out_dir


@dataclass
class TinyModelOptions:
    """``qwen-sft make-tiny-model``: each field's help is the CLI help; ``spec()`` is the model it writes."""

    out: Path = option(help="output directory")
    model_type: ModelType = option(TinySpec.model_type, "--model_type", "--model-type",
                                   help="qwen3_moe (Qwen3-Coder-30B-A3B) or qwen3_next (Qwen3-Coder-Next)")
    layers: int | None = option(None, "--layers", help=(
        f"decoder layers; default {TinySpec.layers} ({NEXT_DEFAULTS['layers']} for qwen3_next)"))
    hidden: int = option(TinySpec.hidden, "--hidden", help="hidden size")
    heads: int = option(TinySpec.heads, "--heads", help="attention heads")
    kv_heads: int = option(TinySpec.kv_heads, "--kv-heads", help="key/value heads (grouped-query attention)")
    head_dim: int = option(TinySpec.head_dim, "--head-dim", help="width of one attention head")
    experts: int | None = option(None, "--experts", help=(
        f"routed experts per layer; default {TinySpec.experts} ({NEXT_DEFAULTS['experts']} for qwen3_next)"))
    active: int | None = option(None, "--active", help=(
        f"experts per token (top-k); default {TinySpec.active} ({NEXT_DEFAULTS['active']} for qwen3_next)"))
    moe_intermediate: int = option(TinySpec.moe_intermediate, "--moe-intermediate", help="width of one expert")
    full_attention_interval: int = option(TinySpec.full_attention_interval, "--full-attention-interval", help=(
        "qwen3_next: every N-th layer is full attention, the rest Gated DeltaNet"))
    seed: int = option(TinySpec.seed, "--seed", help=f"seed of the random weights (default {TinySpec.seed})")
    dtype: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "--dtype", help="dtype of the saved weights")
    tokenizer: str | None = option(None, "--tokenizer", help=(
        "tokenizer to save with it (default: the offline-built Qwen3-Coder tokenizer)"))

    def __post_init__(self) -> None:
        base = NEXT_DEFAULTS if self.model_type == "qwen3_next" else {}
        for key in ("layers", "experts", "active"):  # the model type's own default where none was given
            if getattr(self, key) is None:
                setattr(self, key, base.get(key, getattr(TinySpec, key)))
        problems = [f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "experts", "active",
                                 "moe_intermediate", "full_attention_interval") if getattr(self, name) < 1]
        if self.active > self.experts:
            problems.append(f"--active ({self.active}) cannot exceed --experts ({self.experts})")
        if problems:
            raise ValueError("; ".join(problems))

    def spec(self) -> TinySpec:
        return TinySpec(layers=self.layers, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
                        head_dim=self.head_dim, experts=self.experts, active=self.active,
                        moe_intermediate=self.moe_intermediate, seed=self.seed, model_type=self.model_type,
                        full_attention_interval=self.full_attention_interval)


def tiny_model_parser() -> OptionParser:
    return build_parser(
        "qwen-sft make-tiny-model", [TinyModelOptions],
        description="Write a tiny random-weight Qwen3-MoE (or Qwen3-Next) model with Qwen3-Coder's "
                    "architecture and tokenizer.",
        epilog="example: qwen-sft make-tiny-model ./tiny-qwen3-moe --layers 2 --hidden 64 --experts 8 --active 2")


def main(argv: list[str] | None = None) -> int:
    (opts,) = parse_or_exit(tiny_model_parser(), argv)
    out = make_tiny_model(opts.out, opts.spec(), tokenizer=opts.tokenizer, dtype=opts.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
