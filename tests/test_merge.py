"""Merging LoRA / QLoRA / expert-engine adapters into a tiny Qwen3-MoE: exact math, artifacts, verification.

    python -m pytest -q tests/test_merge.py

Every adapter gets random non-zero lora_B, so a merge that writes the unmodified base cannot pass.
The tiny base has hidden 64 != 2 * moe_intermediate 24 * 2 and non-square attention projections, so a
transposed or gate/up-swapped ΔW cannot line up by accident.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen_sft.merge.cli import main
from qwen_sft.model.tiny import TinySpec, make_tiny_model

SPEC = TinySpec(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=24, experts=8, active=2, moe_intermediate=24)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("merge") / "base", SPEC)


def _randomize_lora_B(model, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(("lora_gate_up_B", "lora_down_B")):  # peft's and the engine's
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "modules_to_save" in name:  # a trained copy of the module, not the base's
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def make_adapter(base: Path, out: Path, *, target_modules=ATTN, target_parameters=None, qlora: bool = False,
                 seed: int = 0, **lora_kw) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16) if qlora else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if qlora else torch.float32,
                                                 quantization_config=quant)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules,
                     target_parameters=target_parameters, **lora_kw)
    model = get_peft_model(model, cfg)
    _randomize_lora_B(model, seed)
    model.save_pretrained(out)
    return out


def merge(base: Path, adapter: Path, out: Path, *extra: str) -> int:
    return main(["--base_model_path", str(base), "--adapter_path", str(adapter), "--output_path", str(out), *extra])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def info(out: Path) -> dict:
    return json.loads((out / "qwen_sft_merge.json").read_text())


def assert_reloads_strictly(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert {k: v for k, v in loading.items() if v} == {}


def changed_keys(base: Path, out: Path) -> set[str]:
    a, b = tensors(base), tensors(out)
    assert set(a) == set(b)
    return {k for k in a if not torch.equal(a[k], b[k])}


def expert_keys(layer: int, projs=("gate_proj", "up_proj", "down_proj")) -> set[str]:
    return {f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for e in range(SPEC.experts) for p in projs}


def attn_keys(layer: int, projs=ATTN) -> set[str]:
    return {f"model.layers.{layer}.self_attn.{p}.weight" for p in projs}


def test_expert_delta_equals_peft_delta_weight(base_dir, tmp_path):
    """Our per-expert ΔW is exactly peft's ParamWrapper.get_delta_weight, sliced into gate / up / down."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_sft.merge.adapter import read_adapter
    from qwen_sft.merge.plan import plan_merge, read_base

    adapter = make_adapter(base_dir, tmp_path / "a", target_modules=[], target_parameters=EXPERTS)
    plan = plan_merge(read_adapter(adapter), read_base(base_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    outer = model.base_model.model.model.layers[1].mlp.experts  # down_proj wraps gate_up_proj
    down, gate_up = outer.get_delta_weight("default"), outer.base_layer.get_delta_weight("default")
    assert (outer.parameter_name, outer.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    inter = SPEC.moe_intermediate
    for e in range(SPEC.experts):
        prefix = f"model.layers.1.mlp.experts.{e}"
        torch.testing.assert_close(plan[f"{prefix}.gate_proj.weight"].compute(), gate_up[e, :inter], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(plan[f"{prefix}.up_proj.weight"].compute(), gate_up[e, inter:], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(plan[f"{prefix}.down_proj.weight"].compute(), down[e], rtol=1e-6, atol=1e-7)
    assert len(plan) == 3 * SPEC.experts * SPEC.layers


def test_fp32_merge_reproduces_peft_forward_exactly(base_dir, tmp_path):
    """Without bf16 rounding the merged model IS base + adapter: logits agree to fp32 precision."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(base_dir, tmp_path / "a", target_parameters=EXPERTS)
    assert merge(base_dir, adapter, tmp_path / "out", "--dtype", "float32", "--no_verify") == 0
    ids = torch.tensor([[151644, 872, 198, 750, 9016, 1445, 982, 151645, 198, 151644, 77091, 198]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, merged(input_ids=ids).logits
        with ref.disable_adapter():
            plain = ref(input_ids=ids).logits
    assert (a - plain).abs().max() > 0.1  # the adapter matters...
    assert (a - b).abs().max() < 1e-5  # ...and the merge reproduces it


def test_attention_only_adapter(base_dir, tmp_path, capsys):
    adapter = make_adapter(base_dir, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0
    assert changed_keys(base_dir, out) == attn_keys(0, ["q_proj", "v_proj"]) | attn_keys(1, ["q_proj", "v_proj"])
    assert info(out)["adapted_tensors"] == {"lora": 4, "expert": 0, "replace": 0}
    assert info(out)["verification"]["passed"] is True
    assert "verify: max |Δlogit|" in capsys.readouterr().out


def test_expert_and_attention_adapter_gives_per_expert_keys(base_dir, tmp_path, capsys):
    adapter = make_adapter(base_dir, tmp_path / "a", target_parameters=EXPERTS)
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0
    assert changed_keys(base_dir, out) == expert_keys(0) | expert_keys(1) | attn_keys(0) | attn_keys(1)
    keys = set(tensors(out))
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in keys)
    assert {k for k in keys if ".experts." in k} == expert_keys(0) | expert_keys(1)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "merges.txt",
                                                     "model.safetensors", "qwen_sft_merge.json",
                                                     "tokenizer_config.json", "vocab.json"]
    v = info(out)["verification"]
    assert v["passed"] and v["distinguishable"] and v["p90_abs_diff"] <= v["tolerance"] < v["adapter_effect"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_reloads_strictly(out)


def test_seed_config_names_rewritten_by_peft(base_dir, tmp_path):
    """gate_proj/up_proj/down_proj in target_modules: peft 0.21 retargets the fused params, doubling r and alpha."""
    adapter = make_adapter(base_dir, tmp_path / "a", target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 8} and cfg["alpha_pattern"] == {r".*\.gate_up_proj": 16}
    assert sorted(cfg["target_parameters"]) == ["down_proj", "gate_up_proj"]
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0
    assert changed_keys(base_dir, out) == expert_keys(0) | expert_keys(1) | attn_keys(0) | attn_keys(1)


def test_legacy_per_expert_layout(base_dir, tmp_path):
    """Adapters saved before transformers fused the experts: one LoRA pair per expert projection."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    h, inter, r = SPEC.hidden, SPEC.moe_intermediate, 4
    shapes = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    sd = {}
    for layer in range(SPEC.layers):
        for e in range(SPEC.experts):
            for proj, (o, i) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                sd[f"{key}.lora_A.weight"] = torch.randn(r, i, generator=g) * 0.2
                sd[f"{key}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.05
    adapter = tmp_path / "legacy"
    adapter.mkdir()
    save_file(sd, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["gate_proj", "up_proj", "down_proj"], "base_model_name_or_path": str(base_dir)}))
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0  # the reference is peft's own conversion of the old layout
    assert changed_keys(base_dir, out) == expert_keys(0) | expert_keys(1)
    assert info(out)["adapted_tensors"] == {"lora": 48, "expert": 0, "replace": 0}


def test_qlora_adapter_with_training_tokenizer(base_dir, tmp_path, capsys):
    """Trained on a 4-bit base: merged into bf16 with a one-line note; the tokenizer saved beside it wins."""
    from transformers import AutoTokenizer

    adapter = make_adapter(base_dir, tmp_path / "a", target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS,
                           qlora=True, modules_to_save=["lm_head"])
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tok.save_pretrained(adapter)
    (adapter / "train_config.yaml").write_text("model_name_or_path: base\nuse_qlora: true\nbnb_4bit_quant_type: nf4\n")
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("note: QLoRA")] == [
        "note: QLoRA adapter (use_qlora=true in train_config.yaml): trained against 4/8-bit base weights, merged into "
        "the 16-bit base, so the merged model differs slightly from the quantized model of training"]
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    assert "lm_head.weight" in changed_keys(base_dir, out)
    assert info(out)["adapted_tensors"] == {"lora": 4, "expert": 48, "replace": 1}


def test_expert_engine_adapter(base_dir, tmp_path):
    """The MoE expert engine (NF4 experts, per-expert LoRA) saves peft's layout; it merges like peft's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_sft.moe import ExpertLoraSpec, install_expert_engine, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    install_expert_engine(model, quantize_experts=True, lora=ExpertLoraSpec(r=4, alpha=8), compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"], lora_dropout=0.0))
    _randomize_lora_B(model, seed=5)
    adapter = save_adapter(model, tmp_path / "engine", base_model_name_or_path=str(base_dir))
    out = tmp_path / "merged"
    assert merge(base_dir, adapter, out) == 0
    assert changed_keys(base_dir, out) == expert_keys(0) | expert_keys(1) | attn_keys(0, ["k_proj"]) | attn_keys(
        1, ["k_proj"])
    assert info(out)["verification"]["passed"] is True


def _sha(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_multi_shard_all_checkpoints_deterministic(base_dir, tmp_path, capsys):
    """Sharded base → same shard files + index; --all_checkpoints; a second run writes identical bytes."""
    from transformers import AutoModelForCausalLM

    base = base_dir
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(sharded, max_shard_size="2MB")
    for name in ("generation_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (sharded / name).write_bytes((base / name).read_bytes())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    run = tmp_path / "run"
    make_adapter(sharded, run, target_parameters=EXPERTS, seed=1)
    make_adapter(sharded, run / "checkpoint-10", target_parameters=EXPERTS, seed=2)
    out = tmp_path / "merged"
    assert merge(sharded, run, out, "--all_checkpoints") == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert sorted(p.name for p in (out / "checkpoint-10").glob("*.safetensors")) == shards
    index = json.loads((out / "checkpoint-10" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert capsys.readouterr().out.count("verify: max |Δlogit|") == 2
    key = "model.layers.1.mlp.experts.7.up_proj.weight"
    assert not torch.equal(tensors(out)[key], tensors(out / "checkpoint-10")[key])  # two adapters, two results
    first, first_info = _sha(out), info(out)
    # Same command again (without the logits check, which is not what this test is about): identical bytes.
    assert merge(sharded, run, out, "--all_checkpoints", "--no_verify") == 0
    second = _sha(out)
    assert len(second) == len(first) == 2 * (len(shards) + 7)  # shards, index, 2 configs, 3 tokenizer, info
    assert {k: v for k, v in second.items() if not k.endswith("qwen_sft_merge.json")} == {
        k: v for k, v in first.items() if not k.endswith("qwen_sft_merge.json")}
    assert {**info(out), "verification": None} == {**first_info, "verification": None}
