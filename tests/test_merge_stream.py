"""Streaming: a multi-shard checkpoint merges with peak RSS near one shard, not the model; checkpoint discovery.

    python -m pytest -q tests/test_merge_stream.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_sft.merge.cli import find_jobs
from qwen_sft.model.tiny import TinySpec, tiny_config

# Many expert-heavy layers and a small vocabulary, so the model (~110 MiB) dwarfs one 8 MB shard.
SPEC = TinySpec(layers=16, hidden=256, heads=4, kv_heads=2, head_dim=64, experts=32, active=2, moe_intermediate=128)
VOCAB = 4096

# Runs in a fresh interpreter: import everything first, then measure how far the merge lifts peak RSS.
# Peak = VmHWM of /proc/self/status, the high-water mark of this process image; ru_maxrss would not do, since
# a child inherits its parent's ru_maxrss across fork + exec (a pytest parent holding models would leak in).
CHILD = r"""
import json, re, sys
import psutil, torch, safetensors.torch, tqdm, peft.utils.other, transformers, yaml
from qwen_sft.merge.cli import main
baseline = psutil.Process().memory_info().rss
rc = main(sys.argv[1:])
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"rc": rc, "baseline": baseline, "peak": peak}))
"""


def write_base(path: Path) -> int:
    """A sharded bf16 Qwen3-MoE with a small vocabulary + the offline tokenizer files; returns its weight bytes."""
    from transformers import Qwen3MoeForCausalLM

    from qwen_sft.tokenizer import offline_tokenizer_dir

    config = tiny_config(SPEC)
    config.vocab_size, config.pad_token_id, config.eos_token_id = VOCAB, 0, 1
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="8MB")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (path / name).write_bytes((offline_tokenizer_dir() / name).read_bytes())
    return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def write_adapter(base: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out)


@pytest.mark.slow  # builds a 110 MiB checkpoint and merges it in a subprocess (~30 s on 2 busy cores)
def test_peak_rss_is_a_few_shards_not_the_model(tmp_path):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    total = write_base(base)
    write_adapter(base, adapter)
    shards = sorted(base.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    assert len(shards) >= 14 and total > 100 * 2**20
    proc = subprocess.run([sys.executable, "-c", CHILD, "--base_model_path", str(base), "--adapter_path", str(adapter),
                           "--output_path", str(out), "--no_verify"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    lifted = m["peak"] - m["baseline"]
    print(f"merge of {total / 2**20:.1f} MiB in {len(shards)} shards (largest {largest / 2**20:.1f} MiB): "
          f"peak RSS +{lifted / 2**20:.1f} MiB over the imported interpreter")
    assert m["rc"] == 0 and sorted(p.name for p in out.glob("model-*.safetensors")) == [p.name for p in shards]
    # Input shard (mmap) + output shard + adapter (~8 MiB here) + allocator slack + the tokenizer copied beside
    # the output (tens of MiB, fixed; measured +41 MiB in a warm checkout, +56 MiB in a fresh clone);
    # loading the model instead would add >= total.
    assert lifted < total * 3 / 4


def test_find_jobs_orders_checkpoints_numerically(tmp_path):
    for name in ("checkpoint-100", "checkpoint-5", "checkpoint-20", "runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "adapter_config.json").write_text("{}")
    assert find_jobs(tmp_path, all_checkpoints=False) == [(tmp_path, ".")]
    assert [sub for _, sub in find_jobs(tmp_path, all_checkpoints=True)] == [
        ".", "checkpoint-5", "checkpoint-20", "checkpoint-100"]
