"""Sequence parallelism (DeepSpeed Ulysses through accelerate, qwen_sft/train/sp.py).

    python -m pytest -q tests/test_sp.py                 # validation and the pieces, fast
    python -m pytest -q -m slow tests/test_sp.py -k torchrun

The slow test trains the tiny Qwen3-MoE (LoRA on attention and every expert through the expert engine,
DeepSpeed ZeRO-2, gradient checkpointing, chunked loss, token-budget packing, router aux loss) with
``torchrun --nproc_per_node 2`` on CPU (gloo) and ``sp_size=2``: every sequence is split over both ranks. The
same run in one process without SP must give the same loss, gradient norm and adapter at every step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, run_group

REPO = Path(__file__).resolve().parent.parent


# --- validation ------------------------------------------------------------------------------------------------


def _config(heads=32, kv=4, model_type="qwen3_moe"):
    from qwen_sft.model.tiny import TinySpec, tiny_config

    spec = TinySpec(heads=heads, kv_heads=kv, model_type=model_type, **({"layers": 4} if model_type != "qwen3_moe"
                                                                          else {}))
    return tiny_config(spec)


def test_sp_heads_kv_heads_and_world_size_checked():
    from qwen_sft.train.sp import model_problems

    real = _config(32, 4)  # Qwen3-Coder-30B-A3B: 32 query / 4 KV heads
    for sp in (2, 4, 8):
        assert model_problems(sp, real, world_size=8) == []  # sp 8: DeepSpeed repeats each KV head twice
    problems = model_problems(3, real, world_size=6)
    assert len(problems) == 2
    assert "must divide the 32 attention heads" in problems[0] and "[2, 4, 8, 16, 32]" in problems[0]
    assert "4 KV heads" in problems[1]
    assert model_problems(16, real, world_size=16) == []  # 16 | 32 heads and 4 | 16: KV heads repeated 4x
    assert model_problems(2, real, world_size=3) == [
        "sp_size=2 must divide the number of processes (WORLD_SIZE=3): launch with torchrun --nproc_per_node a "
        "multiple of 2"]
    assert model_problems(1, real, world_size=3) == []


def test_sp_refuses_linear_attention_qwen3_next():
    from qwen_sft.train.sp import model_problems

    problems = model_problems(2, _config(4, 2, "qwen3_next"), world_size=2)
    assert len(problems) == 1 and "['linear_attention'] layers" in problems[0] and "sp_size=1" in problems[0]


def test_sp_option_conflicts_in_one_line(tmp_path):
    from qwen_sft.train.args import long_sequence_conflicts, parse_flags

    config = parse_flags(["--output_dir", str(tmp_path), "--sp_size", "2", "--packing", "false",
                          "--chunked_loss", "false"])
    problems = long_sequence_conflicts(config.data, config.run, config.training)
    assert problems == ["sp_size=2 needs DeepSpeed (Ulysses runs inside its engine): add --deepspeed "
                        "configs/zero2.json; packing=true (the sequence is sharded by position_ids, which padded "
                        "batches do not carry); max_tokens_per_batch (or token_budget_batching=true): a micro-batch "
                        "is one packed row, which Ulysses shards (its batch size is fixed at one row); chunked_loss=true (the loss whose sums and counts are reduced over "
                        "the SP group)"]
    ok = parse_flags(["--output_dir", str(tmp_path), "--sp_size", "2", "--deepspeed", "configs/zero2.json",
                      "--max_tokens_per_batch", "4096"])
    assert long_sequence_conflicts(ok.data, ok.run, ok.training) == []
    assert ok.training.per_device_train_batch_size == 1  # Ulysses' row count: one packed row per micro-batch
    assert ok.origins["per_device_train_batch_size"] == "sp_size > 1: one packed row per micro-batch"


def test_the_validation_pass_sees_the_deepspeed_of_the_config(tiny_model_dir, tmp_path, monkeypatch):
    """validate() checks the SP options on the parsed values (TrainingArguments is built later): it saw no
    deepspeed there once, and refused every SP run under torchrun."""
    from qwen_sft.train.args import parse_flags
    from qwen_sft.train.validate import ConfigError, validate

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: "sp_size must divide" is expected, not this
    config = parse_flags(["--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(tiny_model_dir),
                          "--data_path", str(tmp_path / "none.jsonl"), "--sp_size", "2",
                          "--deepspeed", "configs/zero2.json", "--max_tokens_per_batch", "64"])
    try:
        validate(config)
        message = ""
    except ConfigError as err:
        message = str(err)
    assert "needs DeepSpeed" not in message, message


def test_sp_validation_pass_reads_the_model_config(tiny_model_dir, tmp_path, monkeypatch):
    from qwen_sft.train.validate import find_problems

    monkeypatch.setenv("WORLD_SIZE", "2")
    values = {"model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path), "sp_size": 4,
              "data_path": str(tmp_path)}
    problems = find_problems(values)  # the tiny model: 4 heads, 2 KV heads; 2 processes
    assert any(p.startswith("sp_size=4 must divide the number of processes (WORLD_SIZE=2)") for p in problems)
    assert not any("attention heads" in p for p in problems)


# --- the pieces --------------------------------------------------------------------------------------------------


def test_sp_collator_pads_rows_to_a_multiple_of_sp():
    from qwen_sft.train.collate import make_collator
    from qwen_sft.train.sp import REAL, SPCollator

    collate = SPCollator(make_collator(True, 7), sp_size=4, pad_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # the padding is a sample of its own
    assert batch[REAL].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    even = collate([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}])
    assert even["input_ids"].shape == (1, 4) and even[REAL].tolist() == [[1, 1, 1, 1]]


def test_packed_sdpa_equals_the_block_diagonal_mask():
    """What Ulysses hands the core attention: the gathered row, no mask, position ids restarting per sample."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from qwen_sft.train.sp import install_packed_sdpa

    saved = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        install_packed_sdpa()
        packed = ALL_ATTENTION_FUNCTIONS["sdpa"]
        assert packed is not saved and getattr(packed, "_qwen_sft_packed", False)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = saved
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    out, _ = packed(module, q, k, v, None, position_ids=pos, scaling=8 ** -0.5, dropout=0.0)
    seg = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    ref, _ = sdpa_attention_forward(module, q, k, v, allowed[None, None], scaling=8 ** -0.5, dropout=0.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    whole, _ = sdpa_attention_forward(module, q, k, v, None, scaling=8 ** -0.5, dropout=0.0)
    assert not torch.allclose(out, whole, atol=1e-3)  # plain sdpa without the mask lets samples attend across


# --- two ranks, one sequence ----------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict, timeout: int) -> str:
    code, out = run_group(cmd, env, REPO, timeout)
    assert code == 0, out[-6000:]
    return out


@pytest.mark.slow
def test_sp2_under_torchrun_equals_one_process(tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(10):  # odd lengths (rows padded to a multiple of 2), long prompts (slices with no target)
            n_prompt, n_answer = 9 + 3 * i, 3 + (i * 5) % 7
            ids = [151644, 872, 198, *range(2000 + 7 * i, 2000 + 7 * i + n_prompt), *range(900 + i, 900 + i + n_answer),
                   151645]
            labels = [-100] * (3 + n_prompt) + ids[3 + n_prompt:]
            fh.write(json.dumps({"input_ids": ids, "label": labels}) + "\n")
    adapter_config = json.loads((REPO / "configs/lora/adapter_config.json").read_text())
    adapter_config["lora_dropout"] = 0.0  # dropout masks are drawn per rank: the two runs would differ by chance
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config))
    common = [f"peft_config_path={tmp_path / 'adapter_config.json'}", "router_aux_loss_coef=0.05", "max_tokens_per_batch=48", "gradient_accumulation_steps=2",
              "max_steps=3", "learning_rate=5e-3", "warmup_steps=0", "lr_scheduler_type=constant",
              "save_strategy='no'", "report_to=none", f"data_path={data}", f"model_name_or_path={tiny_model_dir}",
              f"data_cache_dir={tmp_path / 'cache'}", "loss_chunk_tokens=8", "deepspeed=configs/zero2.json",
              "max_grad_norm=1.0", "loss_curve=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_PORT": free_port(),
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    config = str(REPO / "configs/train/lora_tiny_cpu.yaml")
    runs = {}
    for name, launcher, extra in (
            ("one", [sys.executable, "-m", "qwen_sft.cli"], ["deepspeed=null"]),
            ("sp2", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     env["MASTER_PORT"], "-m", "qwen_sft.cli"], ["sp_size=2"])):
        out = tmp_path / name
        text = _run([*launcher, "train", config, *common, *extra, f"output_dir={out}"], env, timeout=900)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[name] = ([h for h in history if "loss" in h], load_file(out / "adapter_model.safetensors"), text)
    (one, one_adapter, _), (sp2, sp2_adapter, sp_text) = runs["one"], runs["sp2"]
    assert "sequence parallelism: 2 ranks per sequence, 1 data-parallel group(s), one packed row" in sp_text
    assert len(one) == len(sp2) == 3
    for a, b in zip(one, sp2):  # loss and global gradient norm (before clipping) of every optimizer step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-6)
        assert b["supervised_share"] == a["supervised_share"]  # both count the same tokens (padding excluded)
    assert one_adapter.keys() == sp2_adapter.keys() and any(".mlp.experts." in k for k in one_adapter)
    for key, value in one_adapter.items():  # after 3 AdamW steps, which magnify fp32 noise on tiny gradients
        assert (sp2_adapter[key] - value).abs().max() <= 5e-4 * value.abs().max(), key


@pytest.mark.slow
def test_sp_rehearsal_traces_the_ulysses_exchanges(tmp_path):
    """bench/sp_rehearsal.py on a tiny config with 1 KV head and sp 2: DeepSpeed repeats the KV head (one per
    rank), and every exchange of the traced step has the shape Ulysses gives it."""
    from qwen_sft.model.tiny import TinySpec, tiny_config

    tiny_config(TinySpec(heads=4, kv_heads=1)).save_pretrained(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    _run([sys.executable, str(REPO / "bench/sp_rehearsal.py"), str(tmp_path / "config.json"), "--seq", "256", "--sp",
          "2", "--set", "tiny:layers=all", "--json", str(tmp_path / "out.json")], env, timeout=600)
    row = json.loads((tmp_path / "out.json").read_text())
    assert row["tokens_per_rank"] == 128 and row["peak"] > 0
    assert row["all_to_alls"] == 2 * 4 * 2  # 2 layers x (q, k, v, output) x (forward, checkpoint recompute)
    # [sp, tokens per rank, batch, local heads, head_dim]: q 2 of 4 heads, KV 1 head repeated to 2 -> 1 per rank
    assert set(row["all_to_all_shapes"]) == {"(2, 128, 1, 2, 16)", "(2, 128, 1, 1, 16)", "(2, 128, 1, 32)"}
