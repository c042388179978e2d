"""Packed batches give the unpacked loss and gradients; the loss is per supervised token over the whole
gradient-accumulation window, not a mean of micro-batch means.

    python -m pytest -q tests/test_train_loss.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwen_sft.train.args import ModelArguments
from qwen_sft.train.collate import PaddingCollator, make_collator

PAD = 151643


def _samples(lengths_and_supervised: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, sup in lengths_and_supervised:
        ids = torch.randint(0, 5000, (n,), generator=g).tolist()
        labels = [-100] * (n - sup) + ids[n - sup:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _supervised(s: dict) -> int:
    return sum(1 for x in s["labels"][1:] if x != -100)


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    from transformers import AutoConfig

    from qwen_sft.train.model import load_model

    model = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="float32"),
                       AutoConfig.from_pretrained(tiny_model_dir))
    assert model.config.use_cache is False and model.dtype == torch.float32
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flattening_collator_restarts_positions_and_masks_boundaries():
    batch = make_collator(True, PAD)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first label of each sample is -100: the last token of sample 1 must not be trained to predict sample 2.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch


def test_padding_collator():
    batch = PaddingCollator(PAD)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_loss_and_gradients_equal_unpacked(fp32_model):
    model = fp32_model
    samples = _samples([(23, 9), (7, 3), (41, 30)])
    total = sum(map(_supervised, samples))
    model.zero_grad()
    ref_loss = 0.0
    for s in samples:  # one sample at a time: no packing, no padding
        out = model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]]),
                    num_items_in_batch=total)
        out.loss.backward()
        ref_loss += out.loss.item()
    ref = _grads(model)
    for packing in (True, False):
        model.zero_grad()
        out = model(**make_collator(packing, PAD)(samples), num_items_in_batch=total)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(ref_loss, rel=1e-5)
        got = _grads(model)
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{packing=} {name}")
    model.zero_grad()


@pytest.mark.parametrize("chunked", [True, False])
def test_loss_is_per_token_over_the_accumulation_window(fp32_model, tiny_model_dir, tmp_path, chunked):
    """One SGD step (lr 1, no clipping) over 2 micro-batches × 2 samples moves each weight by exactly
    -grad of (sum of token losses over all 4 samples) / (their supervised tokens), with the chunked loss
    (the default) and with the model's own."""
    from transformers import TrainingArguments

    from qwen_sft.train.trainer import SFTTrainer

    model = copy.deepcopy(fp32_model)  # full fine-tuning step: keep the shared fixture untouched
    samples = _samples([(30, 2), (30, 25), (20, 3), (40, 33)], seed=1)
    total = sum(map(_supervised, samples))
    watched = ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.down_proj"]
    params = dict(model.named_parameters())
    model.zero_grad()
    for s in samples:
        model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]]),
              num_items_in_batch=total).loss.backward()
    per_token = {n: params[n].grad.clone() for n in watched}
    model.zero_grad()
    # What a mean of micro-batch means would give for the pairing {0,1},{2,3} (and any other pairing differs too).
    for pair in (samples[:2], samples[2:]):
        n = sum(map(_supervised, pair))
        (model(**make_collator(True, PAD)(pair), num_items_in_batch=n).loss / 2).backward()
    mean_of_means = {n: params[n].grad.clone() for n in watched}
    model.zero_grad()
    before = {n: params[n].detach().clone() for n in watched}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no",
                             remove_unused_columns=False, logging_steps=1, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=samples, data_collator=make_collator(True, PAD),
                         chunked_loss=chunked, loss_chunk_tokens=16)
    trainer.train()
    for n in watched:
        step = before[n] - params[n].detach()
        torch.testing.assert_close(step, per_token[n], rtol=1e-3, atol=1e-6, msg=n)
        assert not torch.allclose(step, mean_of_means[n], rtol=1e-2, atol=1e-6), f"{n}: test cannot tell the two apart"
