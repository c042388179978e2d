"""The chunked cross-entropy equals transformers' causal-LM loss (value and gradients), never holds the full
logits, and gives the same training step through SFTTrainer, with peft + the expert engine and the router aux loss.

    python -m pytest -q tests/test_chunked_loss.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from qwen_sft.train.collate import make_collator
from qwen_sft.train.loss import chunked_lm_loss, shifted_targets

PAD = 151643
V, H = 97, 16


class _LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op produced (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 37, H, generator=g).to(dtype).requires_grad_()
    head = nn.Linear(H, V, bias=False).to(dtype)
    labels = torch.randint(0, V, (2, 37), generator=g)
    labels[0, :10] = -100  # a prompt
    labels[1, 20:25] = -100
    labels[1, -3:] = -100  # padding
    return hidden, head, labels


def _full(hidden, head, labels, **kw):
    return ForCausalLMLoss(head(hidden).float(), labels, V, **kw)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("num_items", [None, 83])
def test_loss_and_gradients_equal_the_full_loss(chunk, num_items):
    hidden, head, labels = _case()
    ref = _full(hidden, head, labels, num_items_in_batch=num_items)
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])
    got = chunked_lm_loss(hidden, head, labels, num_items_in_batch=num_items, chunk_tokens=chunk)
    got_grads = torch.autograd.grad(got, [hidden, head.weight])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_matmul_fp32_logsumexp_matches_within_bf16_tolerance():
    hidden, head, labels = _case(torch.bfloat16, seed=3)
    ref = _full(hidden, head, labels)
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])
    got = chunked_lm_loss(hidden, head, labels, chunk_tokens=5)
    got_grads = torch.autograd.grad(got, [hidden, head.weight])
    assert got.dtype == torch.float32 and got_grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_full_logits_are_never_materialised():
    hidden, head, labels = _case()
    labels[:] = torch.randint(0, V, labels.shape)  # everything supervised: the worst case
    chunk = 8
    with _LargestTensor() as seen:
        chunked_lm_loss(hidden, head, labels, chunk_tokens=chunk).backward()
    # Nothing larger than one chunk of logits, the lm_head weight (its gradient) or the hidden states.
    bound = max(chunk * V, head.weight.numel(), hidden.numel())
    assert seen.largest <= bound < (labels.numel() - 2) * V
    with _LargestTensor() as seen_full:
        _full(hidden.detach().requires_grad_(), head, labels).backward()
    assert seen_full.largest >= (labels.numel() - 2) * V  # the probe sees full logits when they exist


def test_sample_starts_are_never_targets_in_packed_rows():
    """position_ids restart at 0 where a packed sample starts: the previous token must not predict it, whether or
    not the collator already wrote -100 there (ours does; the loss does not rely on it)."""
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shifted_targets(labels).tolist() == [[6, 7, 8, 9, 10, -100]]
    assert shifted_targets(labels, pos).tolist() == [[6, 7, -100, 9, 10, -100]]
    hidden, head, _ = _case()
    hidden = hidden[:1, :6]
    masked = labels.clone()
    masked[0, 3] = -100
    torch.testing.assert_close(chunked_lm_loss(hidden, head, labels, position_ids=pos),
                               _full(hidden, head, masked))


def _samples(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, sup in spec:
        ids = torch.randint(0, 5000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n - sup) + ids[n - sup:]})
    return out


def _trainer(model, tmp_path, chunked, coef=0.0):
    from transformers import TrainingArguments

    from qwen_sft.train.trainer import SFTTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                             remove_unused_columns=False, label_names=["labels"])
    trainer = SFTTrainer(model=model, args=args, data_collator=make_collator(True, PAD), chunked_loss=chunked,
                         loss_chunk_tokens=5, router_aux_loss_coef=coef)
    trainer.current_gradient_accumulation_steps = 2  # what training_step sets; the aux term is divided by it
    return trainer


def _loss_and_grads(trainer, batch, num_items):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(trainer_full, trainer_chunked, batch, num_items, rtol=1e-4, atol=1e-6):
    ref_loss, ref = _loss_and_grads(trainer_full, batch, num_items)
    got_loss, got = _loss_and_grads(trainer_chunked, batch, num_items)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and len(ref) > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)


def test_trainer_loss_and_all_gradients_equal_the_models_own_loss(tiny_model_dir, tmp_path):
    """Full fine-tuning of the tiny MoE (fp32), a packed row of three samples, router aux loss on."""
    from transformers import AutoConfig

    from qwen_sft.train.args import ModelArguments
    from qwen_sft.train.model import load_model

    model = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32"),
                       AutoConfig.from_pretrained(tiny_model_dir))
    model.config.output_router_logits = True
    model.router_aux_loss_coef = 0.0
    model.train()
    batch = make_collator(True, PAD)(_samples([(23, 9), (7, 3), (41, 30)]))
    full, chunked = _trainer(model, tmp_path, False, coef=0.01), _trainer(model, tmp_path, True, coef=0.01)
    _assert_same(full, chunked, batch, num_items=torch.tensor(100))
    assert chunked._aux_n == 1 and full._aux_n == 1 and chunked._aux_sum == pytest.approx(full._aux_sum)
    assert "lm_head.weight" in dict(model.named_parameters())


def test_trainer_chunked_loss_with_peft_and_the_expert_engine(tmp_path):
    """LoRA on attention through peft, expert LoRA through the engine (NF4 base): same loss and LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.model.tiny import TinySpec, build_tiny_model
    from qwen_sft.moe import ExpertLoraSpec, enable_expert_lora, install_expert_engine

    build_tiny_model(TinySpec(layers=2)).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    install_expert_engine(model, quantize_experts=True, lora=ExpertLoraSpec(r=4, alpha=8), compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    enable_expert_lora(model)
    with torch.no_grad():  # B factors start at zero; give them values so that every gradient path is exercised
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_gate_up_B" in n or "lora_down_B" in n:
                p.normal_(0, 0.02)
    model.train()
    batch = make_collator(True, PAD)(_samples([(30, 12), (19, 19)], seed=2))
    _assert_same(_trainer(model, tmp_path, False), _trainer(model, tmp_path, True), batch, num_items=31)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_down_A" in n for n in names) and any("q_proj.lora_A" in n for n in names)


def test_offload_moves_every_saved_tensor_through_the_host_and_keeps_the_gradients(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from transformers import AutoConfig

    from qwen_sft.train.args import ModelArguments
    from qwen_sft.train.model import load_model

    model = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32"),
                       AutoConfig.from_pretrained(tiny_model_dir))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = make_collator(True, PAD)(_samples([(40, 10), (25, 25)], seed=4))
    plain = _trainer(model, tmp_path, True)
    packed_bytes = []

    class Spy(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counting(t):
                packed_bytes.append(t.numel() * t.element_size())
                return pack(t)

            self.pack_hook = counting

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    offload = _trainer(model, tmp_path, True)
    offload.offload_activations = True
    _assert_same(plain, offload, batch, num_items=63, rtol=1e-6, atol=1e-7)
    layers, tokens, hidden = model.config.num_hidden_layers, batch["input_ids"].numel(), model.config.hidden_size
    assert sum(packed_bytes) >= layers * tokens * hidden * 4  # at least every checkpointed layer's input


def test_evaluate_gives_the_same_eval_loss(tmp_path):
    from transformers import TrainingArguments

    from qwen_sft.model.tiny import TinySpec, build_tiny_model
    from qwen_sft.train.trainer import SFTTrainer

    data = [{"input_ids": list(range(1, n + 1)), "labels": [-100] * 3 + list(range(4, n + 1))} for n in (30, 12, 20)]
    model = build_tiny_model(TinySpec(layers=1)).float()
    losses = []
    for chunked in (True, False):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                                 remove_unused_columns=False, per_device_eval_batch_size=2, label_names=["labels"])
        trainer = SFTTrainer(model=model, args=args, eval_dataset=data, data_collator=make_collator(True, PAD),
                             chunked_loss=chunked)
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
