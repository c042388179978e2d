"""Long trajectories end to end on CPU: the tiny model trained on the real SWE-agent trajectory and a synthetic
32K-token one with the chunked loss, token-budget batching and checkpoint offload gives the plain path's loss.

    python -m pytest -q tests/test_long_seq_e2e.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_sft.train.args import parse_yaml
from qwen_sft.train.run import run

REPO = Path(__file__).resolve().parent.parent
TRAJ = "sweagent__marshmallow-1867__function_calling_replace.traj"
LONG = ["chunked_loss=true", "offload_activations=true", "gradient_checkpointing=true", "loss_chunk_tokens=256"]
PLAIN = ["chunked_loss=false", "gradient_checkpointing=false"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trajectory(realdata_dir, tmp_path_factory) -> dict:
    """The SWE-agent trajectory → ChatML → tokens (7,897 with the offline tokenizer, 975 supervised)."""
    from qwen_sft.data.cli import main
    from qwen_sft.tokenize.pipeline import tokenize_chatml_file

    work = tmp_path_factory.mktemp("traj")
    assert main([str(realdata_dir / TRAJ), "-o", str(work / "chatml.jsonl")]) == 0
    tokenize_chatml_file(work / "chatml.jsonl", work / "tok.jsonl", model="offline", max_len=32768, progress=False)
    (row,) = [json.loads(line) for line in (work / "tok.jsonl").read_text().splitlines()]
    assert len(row["input_ids"]) > 4096 and 0 < sum(x != -100 for x in row["label"]) < len(row["label"]) / 4
    return row


def _synthetic(n: int, supervised_every: int, span: int, seed: int) -> dict:
    """An agent-like row: long unsupervised tool outputs, short supervised assistant turns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (n,), generator=g).tolist()
    label = [x if (i % supervised_every) >= supervised_every - span else -100 for i, x in enumerate(ids)]
    return {"input_ids": ids, "label": label}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train(model_dir, data, out, *extra) -> dict:
    config = parse_yaml(str(REPO / "configs/train/lora_tiny_cpu.yaml"), [
        f"model_name_or_path={model_dir}", f"data_path={data}", f"output_dir={out}", "max_steps=1",
        "per_device_train_batch_size=1", "save_strategy='no'", "loss_curve=false", "report_to=none", "optim=sgd",
        "learning_rate=0.5", "lr_scheduler_type=constant", "warmup_steps=0", "max_grad_norm=0",
        f"data_cache_dir={out}-cache", f"peft_config_path={REPO}/configs/lora/adapter_config.json", *extra])
    torch.manual_seed(0)  # the LoRA A factors are drawn when the adapter is attached, before Trainer seeds
    return run(config)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trajectory_with_long_options_equals_plain_path(tiny_model_dir, trajectory, tmp_path):
    """One optimizer step over the whole data (accumulation covers every micro-batch), so the per-token loss and
    the step are the same however the samples fall into micro-batches: 6 samples one by one (plain, full logits)
    vs 2 token-budget micro-batches (the trajectory cut to 2,048 tokens alone, the 5 short ones packed)."""
    rows = [{k: trajectory[k][:2048] for k in ("input_ids", "label")}]
    rows += [_synthetic(n, 50, 12, seed) for seed, n in enumerate([500, 420, 380, 300, 260])]
    data = _write(tmp_path / "data.jsonl", rows)
    # No LoRA dropout: its masks depend on how the samples fall into micro-batches, the comparison must not.
    lora = json.loads((REPO / "configs/lora/adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**lora, "lora_dropout": 0.0}))
    no_dropout = f"peft_config_path={tmp_path / 'adapter_config.json'}"
    plain = _train(tiny_model_dir, data, tmp_path / "plain", *PLAIN, no_dropout, "model_max_length=2048",
                   "gradient_accumulation_steps=6")
    long = _train(tiny_model_dir, data, tmp_path / "long", *LONG, no_dropout, "model_max_length=2048",
                  "max_tokens_per_batch=2048", "gradient_accumulation_steps=2")
    stats = json.loads((tmp_path / "long" / "data_stats.json").read_text())["train"]["batching"]
    assert stats["micro_batches"] == 2 and stats["samples"] == 6 and stats["max_tokens_per_batch"] == 2048
    assert long["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    a, b = _lora(plain["model"]), _lora(long["model"])
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:  # the same step; the gradients were summed over other micro-batch groupings (fp32 rounding)
        assert ((b[name] - a[name]).norm() / a[name].norm()).item() < 1e-4, name
    assert any("lora_B" in n and b[n].abs().max() > 0 for n in b)  # B starts at zero: the step did train


def test_full_trajectory_and_32k_synthetic_loss_equals_reference(tiny_model_dir, trajectory, tmp_path):
    """The whole real trajectory and a 32,768-token synthetic one (each alone in its micro-batch): the logged loss of
    the first step equals transformers' own loss of the untrained model (LoRA B starts at zero) over the same
    targets. The plain path cannot run here: its logits alone would be 32,768 x 151,936 x 4 B = 19.9 GB."""
    from transformers import AutoModelForCausalLM

    rows = [trajectory, _synthetic(32768, 2000, 60, seed=7)]
    data = _write(tmp_path / "data.jsonl", rows)
    long = _train(tiny_model_dir, data, tmp_path / "long", *LONG, "model_max_length=32768",
                  "max_tokens_per_batch=16384", "gradient_accumulation_steps=2")
    stats = json.loads((tmp_path / "long" / "data_stats.json").read_text())["train"]["batching"]
    assert stats["micro_batches"] == 2 and stats["over_budget_alone"] == 1
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["label"]])
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100  # positions that predict a supervised token
            logits = base(input_ids=ids, logits_to_keep=keep, use_cache=False).logits  # [n_supervised, V]
            targets = labels[:, 1:][labels[:, 1:] != -100]
            total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            count += int(targets.numel())
    assert long["train_loss"] == pytest.approx(total / count, rel=1e-4)
