"""The optimizer of a LoRA run: the Trainer's choice for ``optim``, with the memory options of RunArguments.

    from qwen_sft.train.optim import make_optimizer
    optimizer = make_optimizer(model, training_args, foreach=False)

``foreach``: torch's AdamW defaults to its multi-tensor ("foreach") update on CUDA, which stacks every
parameter's temporaries at once (the prototype trace of the 30B recipe: +1.2 GiB in the optimizer step, the
peak once the loss is chunked); ``False`` updates one parameter at a time, ``None`` keeps torch's default.
It applies to torch's Adam/AdamW only; bitsandbytes' 8-bit optimizers update one parameter at a time
anyway. Their *paged* variants keep the state in CUDA managed memory, which
``torch.cuda.max_memory_allocated`` does not see: the fake-tensor trace counts it as ordinary optimizer
state (same bytes), which is what the card holds.
"""

from __future__ import annotations

import torch

FOREACH_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


def optimizer_cls_and_kwargs(training_args, model, *, foreach: bool | None = None) -> tuple[type, dict]:
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    if foreach is not None and isinstance(cls, type) and issubclass(cls, FOREACH_OPTIMIZERS) \
            and not kwargs.get("fused"):
        kwargs = {**kwargs, "foreach": foreach}
    return cls, kwargs


def make_optimizer(model: torch.nn.Module, training_args, *, foreach: bool | None = None):
    """The trainable parameters under the optimizer ``training_args.optim`` names (one group, no decay split)."""
    cls, kwargs = optimizer_cls_and_kwargs(training_args, model, foreach=foreach)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)
