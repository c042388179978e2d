"""Keep peft from renaming qwen3_next's shared-expert LoRA targets into the routed experts.

    from qwen_sft.moe.peft_targets import peft_targets_as_named
    with peft_targets_as_named(model):
        model = get_peft_model(model, LoraConfig(target_modules=["shared_expert.gate_proj", ...]))

peft 0.21 on transformers v5 rewrites transformers-v4 expert targets for MoE model types that have a
checkpoint conversion mapping (``convert_peft_config_for_transformers``): every target equal to or ending
in ``gate_proj``/``up_proj``/``down_proj`` becomes the fused ``target_parameters`` ``gate_up_proj``/
``down_proj``. On qwen3_next that also catches ``mlp.shared_expert.{gate,up,down}_proj``, ordinary
``nn.Linear`` layers, so their LoRA silently disappears (or, on load, their saved factors are ignored).
Our adapter configs already name v5 modules, so for models with a shared expert the rewrite is turned
off while peft builds or loads the adapter; routed experts are still named in ``target_parameters``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def has_shared_expert(model: nn.Module) -> bool:
    return any(name.endswith(".mlp.shared_expert") for name, _ in model.named_modules())


@contextmanager
def peft_targets_as_named(model: nn.Module) -> Iterator[None]:
    """Within the block, peft uses ``target_modules`` / ``target_parameters`` as written (models with a shared
    expert only; a no-op otherwise, where the v4 → v5 rename is what the seed's adapter configs need)."""
    if not has_shared_expert(model):
        yield
        return
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    # peft imports this function from its module at each call (tuners_utils.inject_adapter), so this reaches it.
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original
