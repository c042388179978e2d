"""Peak memory and time of the streaming merge vs the usual whole-model peft merge, in the same run.

    python bench/bench_merge.py                      # ~400 MiB checkpoint, 48 MiB shards
    python bench/bench_merge.py --layers 8 --shard 32MB

Builds a sharded bf16 Qwen3-MoE with Qwen3-Coder's layout (small vocabulary so experts dominate, as in
the real model where they are 95 % of the weights) and an attention + expert LoRA adapter, then merges
it three ways, each in a fresh interpreter whose peak RSS is read from /proc/self/status (VmHWM):

  stream      qwen-sft merge --no_verify (this project)
  peft-bf16   AutoModelForCausalLM(bf16) + PeftModel + merge_and_unload + save_pretrained
  peft-fp32   the same loaded in fp32, as the upstream recipe does

Reported: peak RSS above the imported interpreter, wall time, ratios vs stream, and the largest
difference between the stream result and the peft-bf16 result (bf16 rounding only).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as a script (bench/ first on sys.path): the repository root, for an uninstalled checkout.
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from qwen_sft.model.checkpoint import ADAPTER_WEIGHTS  # noqa: E402

PRELUDE = r"""
import json, re, sys, time
import psutil, torch, safetensors.torch, tqdm, peft, peft.utils.other, transformers, yaml
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base_rss, t0 = psutil.Process().memory_info().rss, time.perf_counter()
"""
STREAM = PRELUDE + r"""
from qwen_sft.merge.cli import main
rc = main(["--base_model_path", sys.argv[1], "--adapter_path", sys.argv[2], "--output_path", sys.argv[3], "--no_verify"])
print(json.dumps({"rc": rc, "lift": hwm() - base_rss, "seconds": time.perf_counter() - t0}))
"""
PEFT = PRELUDE + r"""
from transformers import AutoModelForCausalLM
from peft import PeftModel
dtype = getattr(torch, sys.argv[4])
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype), sys.argv[2])
model = model.merge_and_unload()
model.to(torch.bfloat16).save_pretrained(sys.argv[3], max_shard_size=sys.argv[5])
print(json.dumps({"rc": 0, "lift": hwm() - base_rss, "seconds": time.perf_counter() - t0}))
"""


def build(work: Path, layers: int, hidden: int, experts: int, inter: int, shard: str) -> tuple[Path, Path, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeForCausalLM

    from qwen_sft.model.checkpoint import EXPERT_TARGET_PARAMETERS, INDEX_FILE
    from qwen_sft.model.tiny import TinySpec, tiny_config
    from qwen_sft.tokenizer import offline_tokenizer_dir

    config = tiny_config(TinySpec(layers=layers, hidden=hidden, heads=8, kv_heads=2, head_dim=64, experts=experts,
                                  active=2, moe_intermediate=inter))
    config.vocab_size, config.pad_token_id, config.eos_token_id = 8192, 0, 1
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    base = work / "base"
    model.save_pretrained(base, max_shard_size=shard)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (base / name).write_bytes((offline_tokenizer_dir() / name).read_bytes())
    peft_model = get_peft_model(model.float(), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=EXPERT_TARGET_PARAMETERS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    adapter = work / "adapter"
    peft_model.save_pretrained(adapter)
    total = json.loads((base / INDEX_FILE).read_text())["metadata"]["total_size"]
    return base, adapter, total


def child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    from qwen_sft.model.checkpoint import read_index

    worst = 0.0
    for shard in sorted(a.glob("*.safetensors")):
        with safe_open(shard, "pt") as fa:
            for key in fa.keys():
                index = read_index(b)
                with safe_open(b / index[key], "pt") as fb:
                    worst = max(worst, float((fa.get_tensor(key).float() - fb.get_tensor(key).float()).abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-intermediate", type=int, default=256)
    p.add_argument("--shard", default="48MB", help="max_shard_size of the base checkpoint")
    p.add_argument("--skip-fp32", action="store_true", help="skip the fp32 whole-model baseline")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_merge.") as tmp:
        work = Path(tmp)
        base, adapter, total = build(work, a.layers, a.hidden, a.experts, a.moe_intermediate, a.shard)
        shards = sorted(base.glob("model-*.safetensors"))
        largest = max(s.stat().st_size for s in shards)
        print(f"checkpoint: {total / 2**20:.1f} MiB bf16 in {len(shards)} shards (largest {largest / 2**20:.1f} MiB); "
              f"adapter {(adapter / ADAPTER_WEIGHTS).stat().st_size / 2**20:.1f} MiB")
        runs = {"stream": child(STREAM, str(base), str(adapter), str(work / "stream"))}
        runs["peft-bf16"] = child(PEFT, str(base), str(adapter), str(work / "peft16"), "bfloat16", a.shard)
        if not a.skip_fp32:
            runs["peft-fp32"] = child(PEFT, str(base), str(adapter), str(work / "peft32"), "float32", a.shard)
        ref = runs["stream"]
        print(f"{'method':<10} {'peak RSS lift':>14} {'× checkpoint':>13} {'× stream':>9} {'seconds':>8} {'× stream':>9}")
        for name, r in runs.items():
            print(f"{name:<10} {r['lift'] / 2**20:>10.1f} MiB {r['lift'] / total:>13.2f} {r['lift'] / ref['lift']:>9.2f} "
                  f"{r['seconds']:>8.1f} {r['seconds'] / ref['seconds']:>9.2f}")
        print(f"max |stream - peft-bf16| over all weights: {max_diff(work / 'stream', work / 'peft16'):.3g} "
              "(bf16 rounding of W + ΔW done once in fp32 vs in bf16)")


if __name__ == "__main__":
    main()
