"""One entry point that converts a loaded Qwen3-MoE model to the expert engine.

    from qwen_sft.moe import ExpertLoraSpec, install_expert_engine
    report = install_expert_engine(model, quantize_experts=True, double_quant=True,
                                   lora=ExpertLoraSpec(r=8, alpha=16), compute_dtype=torch.bfloat16,
                                   device="cuda")
    print(report.summary())

Each layer's ``mlp.experts`` (``Qwen3MoeExperts``, fused 3-D ``gate_up_proj``/``down_proj``) is replaced,
one layer at a time, by an :class:`ExpertEngine`; with ``quantize_experts`` its 16-bit weights are
moved to ``device`` (if given), quantized to NF4 there, and released before the next layer, so the
accelerator never holds more than one 16-bit expert layer. Call it BEFORE ``peft.get_peft_model``
(attention LoRA), so peft never wraps the experts; ``get_peft_model`` freezes every parameter it did
not create, so call :func:`enable_expert_lora` right after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from qwen_sft.moe.experts import ExpertEngine
from qwen_sft.moe.kernels import resolve_kernels
from qwen_sft.moe.nf4 import DenseExperts, NF4Experts

log = logging.getLogger(__name__)


@dataclass
class ExpertLoraSpec:
    """LoRA on every expert: per-expert rank ``r`` (peft's meaning for target_parameters), scale alpha / r.

    ``gate_up_r``/``gate_up_alpha`` override the fused gate/up projection (peft's ``rank_pattern`` /
    ``alpha_pattern`` key ``gate_up_proj``): a seed config naming gate_proj and up_proj at rank r becomes
    rank 2r, alpha 2*alpha on the fused matrix.
    """

    r: int = 8
    alpha: float = 16.0
    gate_up_r: int | None = None
    gate_up_alpha: float | None = None
    dtype: torch.dtype = torch.float32  # trainable factors in fp32, like peft's autocast_adapter_dtype
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in (("r", self.r), ("gate_up_r", self.gate_up_r)) if v is not None and v <= 0]
        if bad:
            raise ValueError(f"ExpertLoraSpec ranks must be positive, got {', '.join(bad)}")

    @classmethod
    def from_lora_config(cls, cfg: dict, **kw) -> ExpertLoraSpec:
        """From a peft adapter config dict (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``)."""
        rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        r, alpha = int(rp.get("down_proj", cfg.get("r", 8))), float(ap.get("down_proj", cfg.get("lora_alpha", 16)))
        gate_up_alpha = ap.get("gate_up_proj")
        return cls(r=r, alpha=alpha, gate_up_r=rp.get("gate_up_proj"),
                   gate_up_alpha=None if gate_up_alpha is None else float(gate_up_alpha), **kw)


@dataclass
class EngineReport:
    layers: int = 0
    expert_weights: int = 0  # base weights held by the experts
    storage_bytes: int = 0  # bytes holding them (packed NF4 + scales, or 16-bit)
    quantized: bool = False
    double_quant: bool = False
    lora_params: int = 0
    paths: list[str] = field(default_factory=list)

    @property
    def bytes_per_weight(self) -> float:
        return self.storage_bytes / max(self.expert_weights, 1)

    def summary(self) -> str:
        kind = ("NF4" + (" + double-quant scales" if self.double_quant else "")) if self.quantized else "16-bit frozen"
        return (f"expert engine: {self.layers} layers, {self.expert_weights:,} expert weights as {kind}, "
                f"{self.storage_bytes / 2**30:.3f} GiB ({self.bytes_per_weight:.4f} bytes/weight), "
                f"expert LoRA params {self.lora_params:,}")


def _is_stock_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def _find_expert_parents(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path of the MoE block, block) for every block whose ``experts`` child is a stock fused experts module."""
    found, problems = [], []
    for name, module in model.named_modules():
        child = getattr(module, "experts", None)
        if not isinstance(child, nn.Module):
            continue
        if isinstance(child, ExpertEngine):
            problems.append(f"{name}.experts already has the expert engine installed")
        elif type(child).__name__ == "ParamWrapper":
            problems.append(f"{name}.experts is wrapped by peft target_parameters; install the engine before peft")
        elif _is_stock_experts(child):
            found.append((name, module))
    if problems:
        raise ValueError("cannot install the expert engine:\n  " + "\n  ".join(problems))
    if not found:
        raise ValueError("no fused MoE experts (mlp.experts.gate_up_proj / down_proj, transformers>=5) in this model")
    return found


def build_engine(gate_up: torch.Tensor, down: torch.Tensor, *, quantize_experts: bool, double_quant: bool,
                 lora: ExpertLoraSpec | None, compute_dtype: torch.dtype, hidden_act: str, blocksize: int,
                 chunk_experts: int, report: EngineReport, path: str, kernels: str | None = None) -> ExpertEngine:
    """One layer's engine from its fused ``gate_up [E, 2I, H]`` and ``down [E, H, I]``; updates ``report``.
    ``kernels``: the registered per-chunk kernels (qwen_sft/moe/kernels.py); None: $QWEN_SFT_EXPERT_KERNELS."""
    stores = [NF4Experts.quantize(w, blocksize=blocksize, double_quant=double_quant) if quantize_experts
              else DenseExperts(w) for w in (gate_up, down)]
    engine = ExpertEngine(*stores, hidden_act=hidden_act, chunk_experts=chunk_experts)
    engine.compute_dtype = compute_dtype
    engine.kernels = kernels
    if lora is not None:
        engine.add_lora(lora.r, lora.alpha, dtype=lora.dtype, seed=lora.seed + report.layers,
                        gate_up_r=lora.gate_up_r, gate_up_alpha=lora.gate_up_alpha)
        report.lora_params += sum(p.numel() for n, p in engine.named_parameters() if n.startswith("lora_"))
    report.expert_weights += gate_up.numel() + down.numel()
    report.storage_bytes += engine.storage_bytes()
    report.layers += 1
    report.paths.append(path)
    return engine


def install_expert_engine(model: nn.Module, *, quantize_experts: bool, double_quant: bool = True,
                          lora: ExpertLoraSpec | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                          device: str | torch.device | None = None, blocksize: int = 64,
                          chunk_experts: int = 32, kernels: str | None = None) -> EngineReport:
    """Replace every ``mlp.experts`` with an :class:`ExpertEngine`; see the module docstring for the order."""
    config = getattr(model, "config", None)
    hidden_act = getattr(config, "hidden_act", "silu")
    if chunk_experts <= 0:
        raise ValueError(f"chunk_experts must be positive, got {chunk_experts=}")
    resolve_kernels(kernels)  # an unknown name fails here, before any layer is converted
    blocks = _find_expert_parents(model)  # validates everything before the first layer is touched
    report = EngineReport(quantized=quantize_experts, double_quant=quantize_experts and double_quant)
    for name, block in blocks:
        old = block.experts
        weights = [getattr(old, attr).detach() for attr in ("gate_up_proj", "down_proj")]
        if device is not None:
            weights = [w.to(device) for w in weights]
        block.experts = build_engine(*weights, quantize_experts=quantize_experts, double_quant=double_quant,
                                     lora=lora, compute_dtype=compute_dtype, hidden_act=hidden_act,
                                     blocksize=blocksize, chunk_experts=chunk_experts, report=report,
                                     path=f"{name}.experts", kernels=kernels)
        # Drop the 16-bit originals now so the next layer can reuse their memory.
        old.gate_up_proj = old.down_proj = None
        del old, weights
        if quantize_experts and torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info(report.summary())
    return report


def enable_expert_lora(model: nn.Module) -> int:
    """Make the engine's LoRA factors trainable again (after ``get_peft_model`` froze them); returns their count."""
    n = 0
    for module in model.modules():
        if isinstance(module, ExpertEngine) and module.has_lora:
            for name, p in module.named_parameters(recurse=False):
                if name.startswith("lora_"):
                    p.requires_grad_(True)
                    n += p.numel()
    return n


def trainable_parameter_groups(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts by group (attention LoRA, expert LoRA, other) — for logs and tests."""
    groups = {"expert_lora": 0, "attention_lora": 0, "other": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".experts.lora_" in name:
            groups["expert_lora"] += p.numel()
        elif "lora_" in name:
            groups["attention_lora"] += p.numel()
        else:
            groups["other"] += p.numel()
    return groups
