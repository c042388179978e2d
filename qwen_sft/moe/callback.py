"""Trainer callback: every checkpoint's adapter also gets the expert factors.

    trainer.add_callback(ExpertAdapterCallback())

``Trainer`` saves a PeftModel through ``save_pretrained``, which keeps only peft's own adapters; the
expert engine's factors would be missing from every ``checkpoint-N/`` and from resumes. On each save
this rewrites ``checkpoint-N/adapter_model.safetensors`` and ``adapter_config.json`` (main process
only) with the factors in peft's ``target_parameters`` layout, exactly as ``save_adapter`` does, then writes
the completion marker (qwen_sft/checkpoint.py) last, so a kill before the factors are in leaves a checkpoint
that resume, merge and export refuse. (qwen-sft's own SFTTrainer does all this inside its save and needs no
callback.)
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from qwen_sft.checkpoint import mark_complete
from qwen_sft.model.checkpoint import ADAPTER_CONFIG
from qwen_sft.moe.lora import add_expert_factors

log = logging.getLogger(__name__)


class ExpertAdapterCallback(TrainerCallback):
    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return control
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (ckpt / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{ckpt}: no {ADAPTER_CONFIG} after save; is the model a PeftModel?")
        n = add_expert_factors(model, ckpt)
        mark_complete(ckpt)
        log.info("added %d expert factor tensors to %s", n, ckpt)
        return control
