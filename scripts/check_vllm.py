"""Opt-in check (``make check-vllm``): vLLM's own LoRA loader accepts ``qwen-sft export-adapter --format vllm``.

    python scripts/check_vllm.py prepare .cache/check-vllm                    # project venv
    .cache/venv-vllm/bin/python scripts/check_vllm.py consume .cache/check-vllm   # vllm venv (CUDA torch; runs on CPU)

``prepare`` builds the tiny qwen3_moe model, a random-B training adapter (attention + every expert through the
expert engine, gate/up at rank 2r) and its vLLM export. ``consume`` imports only vLLM (and its torch) and runs the
code path of vLLM's ``WorkerLoRAManager._load_adapter`` that needs no GPU:

1. ``PEFTHelper.from_local_dir`` + ``validate_legal(LoRAConfig(max_lora_rank=R))`` accept the config, and
   ``max_lora_rank`` below R is refused (the check can fail);
2. ``LoRAModel.from_local_checkpoint`` with the modules vLLM expects for ``Qwen3MoeForCausalLM``: the suffixes of its
   LoRA-capable layers (qkv_proj via its ``packed_modules_mapping`` -> q/k/v_proj, o_proj, the router ``gate``,
   ``experts``, the embeddings) plus ``experts.E.{gate,up,down}_proj`` from vLLM's own
   ``RoutedExperts.build_expert_params_mapping`` — as ``process_packed_modules_mapping`` builds them for a 2-D MoE;
3. one LoRA pair per (layer, expert, projection) with ``[R, in]`` / ``[out, R]`` and scale alpha / R, whose
   ``scale · B @ A`` equals the trained fused ΔW rows of that expert (recomputed here from the training adapter).

With a GPU (``torch.cuda.is_available()``) it also serves the tiny base with the adapter through ``vllm.LLM`` and
compares greedy tokens with the merged model (``qwen-sft merge``); without one that step is reported as skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _check import main, verdict  # scripts/_check.py: standard library only, importable in both venvs

EXPERTS = 8


def prepare(work: Path) -> None:
    from qwen_sft.export.vllm_adapter import export_vllm_adapter
    from qwen_sft.merge.cli import main as merge_main
    from qwen_sft.model.tiny import TinySpec, make_tiny_model
    from qwen_sft.model.tiny_adapter import random_adapter

    work.mkdir(parents=True, exist_ok=True)
    base = make_tiny_model(work / "base", TinySpec(layers=2, experts=EXPERTS), dtype="bfloat16")
    _, adapter = random_adapter(base, work / "adapter")  # attention + every expert, non-zero B
    report = export_vllm_adapter(adapter, work / "adapter-vllm")
    assert merge_main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path",
                       str(work / "merged"), "--no_verify"]) == 0  # the check below is the reference
    (work / "prepared.json").write_text(json.dumps({"rank": report.rank, "experts": EXPERTS, "layers": 2}))
    print(f"prepared {work}: adapter, its vLLM export (r={report.rank}), merged model")


def _fused_deltas(adapter_dir: Path, experts: int) -> dict[str, torch.Tensor]:  # noqa: F821
    """ΔW per (layer, expert, projection) from the training adapter (peft's fused layout, see qwen_sft/moe/lora.py)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key in t:
        if not key.endswith("experts.base_layer.lora_A.weight"):
            continue
        layer = key.split(".experts.")[0].removeprefix("base_model.model.")
        pre = key.removesuffix("base_layer.lora_A.weight")
        for fused, (rank, alpha) in {"gate_up": (cfg["rank_pattern"].get("gate_up_proj", cfg["r"]),
                                                 cfg["alpha_pattern"].get("gate_up_proj", cfg["lora_alpha"])),
                                     "down": (cfg["rank_pattern"].get("down_proj", cfg["r"]),
                                              cfg["alpha_pattern"].get("down_proj", cfg["lora_alpha"]))}.items():
            infix = "base_layer." if fused == "gate_up" else ""
            A = t[f"{pre}{infix}lora_A.weight"].float().reshape(experts, rank, -1)
            B = t[f"{pre}{infix}lora_B.weight"].float()
            B = B.reshape(B.shape[0], rank, experts)
            for e in range(experts):
                delta = (B[:, :, e] @ A[e]) * (alpha / rank)
                if fused == "gate_up":
                    inter = delta.shape[0] // 2
                    out[f"{layer}.experts.{e}.gate_proj"] = delta[:inter]
                    out[f"{layer}.experts.{e}.up_proj"] = delta[inter:]
                else:
                    out[f"{layer}.experts.{e}.down_proj"] = delta
    return out


def consume(work: Path) -> int:
    import torch
    import vllm
    from vllm.config import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

    t0 = time.time()
    meta = json.loads((work / "prepared.json").read_text())
    R, E, L = meta["rank"], meta["experts"], meta["layers"]
    out = work / "adapter-vllm"
    failures = []
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")

    helper = PEFTHelper.from_local_dir(str(out), max_position_embeddings=4096)
    helper.validate_legal(LoRAConfig(max_lora_rank=R))
    smaller = 1  # LoRAConfig allows only 1, 8, 16, 32, …; R is 8 here
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=smaller))
        failures.append(f"validate_legal accepted max_lora_rank={smaller} for an r={R} adapter")
    except ValueError as err:
        if "greater than max_lora_rank" not in str(err):
            raise
        print(f"max_lora_rank {smaller} refused as it should be: {err}")

    # The expected modules, as WorkerLoRAManager._load_adapter derives them for a 2-D MoE Qwen3MoeForCausalLM.
    supported = ["qkv_proj", "o_proj", "gate", "experts", "embed_tokens", "lm_head"]  # read in qwen3_moe.py
    packed = dict(Qwen3MoeForCausalLM.packed_modules_mapping)
    packed["experts"] = [w.rstrip(".") for _, w, _, _ in
                         RoutedExperts.build_expert_params_mapping("gate_proj", "down_proj", "up_proj", E)]
    expected = set()
    for m in supported:
        expected.update(packed.get(m, [m]))
        if m == "experts":
            expected.add(m)
    print(f"expected modules: {sorted(x for x in expected if not x.startswith('experts.'))} + "
          f"{len([x for x in expected if x.startswith('experts.')])} expert entries, e.g. {packed['experts'][:3]}")
    mapper = Qwen3MoeForCausalLM.hf_to_vllm_mapper.get_rename_mapper()
    # The worker loads adapters with device="cpu" and pins them for the later GPU copy; pinning needs a CUDA
    # driver, so without one we turn it off (it changes where the bytes live, not their values).
    if not torch.cuda.is_available():
        import vllm.lora.lora_model as lora_model_mod

        lora_model_mod.PIN_MEMORY = False
    lora = LoRAModel.from_local_checkpoint(str(out), expected, helper, lora_model_id=1, device="cpu",
                                           dtype=torch.float32, weights_mapper=mapper)
    names = set(lora.loras)
    want = {f"model.layers.{n}.mlp.experts.{e}.{p}" for n in range(L) for e in range(E)
            for p in ("gate_proj", "up_proj", "down_proj")}
    attn = {f"model.layers.{n}.self_attn.{p}" for n in range(L) for p in ("q_proj", "v_proj")}
    if names != want | attn:
        failures.append(f"vLLM built {len(names)} LoRA modules; missing {sorted(want | attn - names)[:4]}, "
                        f"unexpected {sorted(names - want - attn)[:4]}")
    deltas = _fused_deltas(work / "adapter", E)
    worst = 0.0
    for name in sorted(want & names):
        w = lora.loras[name]
        if w.rank != R or w.lora_a.shape[0] != R or w.lora_b.shape[1] != R:
            failures.append(f"{name}: rank {w.rank}, A {tuple(w.lora_a.shape)}, B {tuple(w.lora_b.shape)}; want {R}")
            continue
        got = (w.lora_b.float() @ w.lora_a.float()) * w.scaling
        ref = deltas[name]
        if got.shape != ref.shape:
            failures.append(f"{name}: ΔW {tuple(got.shape)} != trained {tuple(ref.shape)}")
            continue
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    if worst > 1e-5:
        failures.append(f"vLLM's scale·B@A differs from the trained ΔW by up to {worst:.3g} (relative)")
    print(f"LoRAModel: {len(names)} modules ({len(want & names)} expert pairs, {len(attn & names)} attention), "
          f"rank {lora.rank}, scaling {next(iter(lora.loras.values())).scaling}, max relative ΔW error {worst:.2e}")

    if torch.cuda.is_available():
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        prompts = ["def fibonacci(n):", "SELECT count(*) FROM users", "The quick brown fox"]
        sp = SamplingParams(temperature=0.0, max_tokens=8)
        llm = LLM(model=str(work / "base"), enable_lora=True, max_lora_rank=R, max_model_len=512,
                  gpu_memory_utilization=0.3, dtype="bfloat16", enforce_eager=True)
        with_adapter = [o.outputs[0].token_ids for o in
                        llm.generate(prompts, sp, lora_request=LoRARequest("sft", 1, str(out)))]
        del llm
        llm = LLM(model=str(work / "merged"), max_model_len=512, gpu_memory_utilization=0.3, dtype="bfloat16",
                  enforce_eager=True)
        merged = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        same = sum(a == b for a, b in zip(with_adapter, merged))
        print(f"served: base+adapter vs merged greedy tokens equal for {same}/{len(prompts)} prompts")
        if same != len(prompts):
            failures.append(f"served tokens differ: {with_adapter} vs {merged}")
    else:
        print("serving step skipped: no CUDA device (vLLM serves only on a GPU here)")
    print(f"consume took {time.time() - t0:.1f} s")
    return verdict("check-vllm", failures, "vLLM's loader accepts the export and builds one pair per expert with "
                                           "the trained ΔW")


if __name__ == "__main__":
    main(prepare, consume)
