"""The expert engine under DDP and DeepSpeed ZeRO-2: two CPU ranks (gloo) match one process.

    python -m pytest -q tests/test_moe_distributed.py        # slow tier: torchrun, DeepSpeed start-up

Each rank trains the same NF4 + expert-LoRA tiny model on its own half of a batch for two AdamW steps.
The single-process reference runs the same two steps on the mean of both halves' losses; after each
step every rank's expert LoRA factors must equal the reference's (and each other's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["QWEN_SFT_REPO"])
from qwen_sft.model.tiny import TinySpec, build_tiny_model
from qwen_sft.moe import ExpertLoraSpec, install_expert_engine

mode, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)

def make():
    model = build_tiny_model(TinySpec(layers=2, hidden=64, experts=8, active=2, moe_intermediate=32))
    for p in model.parameters():
        p.requires_grad_(False)
    install_expert_engine(model, quantize_experts=True, lora=ExpertLoraSpec(r=4, alpha=8),
                          compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n and n.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    return model

ids = torch.randint(0, 5000, (world, 12), generator=torch.Generator().manual_seed(2))
def loss_of(model, rows):
    return model(input_ids=rows, labels=rows, use_cache=False).loss

def lora_state(model):
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

# Reference: one process, the mean of every rank's loss, same optimizer.
ref = make()
opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
ref_states = []
for _ in range(2):
    sum(loss_of(ref, ids[r:r + 1]) for r in range(world)).div(world).backward()
    opt.step(); opt.zero_grad()
    ref_states.append(lora_state(ref))

model = make()
params = [p for p in model.parameters() if p.requires_grad]
if mode == "ddp":
    engine = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    def step():
        loss_of(engine, ids[rank:rank + 1]).backward(); opt.step(); opt.zero_grad()
else:
    import deepspeed
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                           optimizer=torch.optim.AdamW(params, lr=1e-2), config=cfg)
    def step():
        loss = loss_of(engine, ids[rank:rank + 1]); engine.backward(loss); engine.step()

errors = []
for i in range(2):
    step()
    got = lora_state(model)
    errors.append(max((got[k] - ref_states[i][k]).abs().max().item() for k in ref_states[i]))
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v.sum().item() for k, v in got.items()})
    assert all(g == gathered[0] for g in gathered), "ranks diverged"
changed = max((lora_state(model)[k] - lora_state(make())[k]).abs().max().item() for k in ref_states[0])
if rank == 0:
    with open(out, "w") as fh:
        json.dump({"max_error_per_step": errors, "n_lora_tensors": len(ref_states[0]), "changed": changed}, fh)
dist.destroy_process_group()
'''


def _torchrun(tmp_path: Path, mode: str) -> dict:
    script, out = tmp_path / "worker.py", tmp_path / f"{mode}.json"
    script.write_text(WORKER)
    env = {**os.environ, "QWEN_SFT_REPO": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                           str(script), mode, str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_ranks_match_single_process(tmp_path, mode):
    if mode == "zero2":
        pytest.importorskip("deepspeed")
    res = _torchrun(tmp_path, mode)
    assert res["n_lora_tensors"] == 2 * 4  # 2 layers x (gate_up A, B, down A, B)
    assert res["changed"] > 1e-3  # training moved the factors ...
    assert max(res["max_error_per_step"]) < 1e-5  # ... exactly as the single-process run did
