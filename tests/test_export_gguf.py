"""``qwen-sft export-gguf``: the file read back by gguf's own reader holds llama.cpp's names (checked against gguf's
tensor-name map, not ours), the exact bf16 weights with experts stacked in order, q8_0 within its block error,
the architecture keys and the tokenizer; bad input is refused before anything is written; peak memory is bounded
by one tensor, not the model. The real consumer (llama.cpp itself) is the opt-in ``make check-gguf``.

    python -m pytest -q tests/test_export_gguf.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from qwen_sft.export.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from qwen_sft.export.gguf_export import main as gguf_main  # noqa: E402
from qwen_sft.model.tiny import TinySpec, make_tiny_model  # noqa: E402

SPEC = TinySpec(layers=2, hidden=64, experts=8, active=2, moe_intermediate=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gguf") / "merged", SPEC, dtype="bfloat16")


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_bf16_export_reads_back_exactly_under_llama_cpp_names(model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert gguf_main([str(model_dir), str(out), "--type", "bf16"]) == 0
    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "qwen3moe"
    cfg = json.loads((model_dir / "config.json").read_text())
    want = {"qwen3moe.block_count": SPEC.layers, "qwen3moe.embedding_length": SPEC.hidden,
            "qwen3moe.attention.head_count": SPEC.heads, "qwen3moe.attention.head_count_kv": SPEC.kv_heads,
            "qwen3moe.attention.key_length": SPEC.head_dim, "qwen3moe.expert_count": SPEC.experts,
            "qwen3moe.expert_used_count": SPEC.active, "qwen3moe.expert_feed_forward_length": SPEC.moe_intermediate,
            "qwen3moe.context_length": SPEC.max_positions, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.eos_token_id": cfg["eos_token_id"]}
    assert {k: _field(reader, k) for k in want} == want
    assert _field(reader, "qwen3moe.rope.freq_base") == pytest.approx(1e7)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"] and tokens[151645] == "<|im_end|>" and tokens[151700] == "[PAD151700]"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[151645] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert len(_field(reader, "tokenizer.ggml.merges")) > 150_000
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")

    # Names: llama.cpp's own map (gguf.TensorNameMap) for every HF tensor; experts as their stacked name.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, SPEC.layers)
    hf = _hf_tensors(model_dir)
    got = {t.name: t for t in reader.tensors}
    expected_names = set()
    for key in hf:
        stacked = key.split(".experts.")[0] + ".experts." + key.rsplit(".", 2)[-2] if ".experts." in key else key
        mapped = name_map.get_name(stacked.removesuffix(".weight"))
        assert mapped is not None, key
        expected_names.add(mapped + ".weight")
    assert set(got) == expected_names and len(got) == 3 + SPEC.layers * 12

    def data(name):  # ggml ne is reversed torch order; bf16 raw bits as uint16
        t = got[name]
        return torch.from_numpy(t.data.copy()).view(torch.bfloat16).reshape(tuple(int(d) for d in reversed(t.shape)))

    assert got["blk.1.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert [int(d) for d in got["blk.1.ffn_down_exps.weight"].shape] == [SPEC.moe_intermediate, SPEC.hidden, SPEC.experts]
    for proj, name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        stacked = data(f"blk.1.{name}.weight")
        for e in range(SPEC.experts):
            assert torch.equal(stacked[e], hf[f"model.layers.1.mlp.experts.{e}.{proj}.weight"]), (name, e)
    assert torch.equal(data("blk.0.attn_q.weight"), hf["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(data("output.weight"), hf["lm_head.weight"])
    for name, key in (("blk.0.ffn_gate_inp.weight", "model.layers.0.mlp.gate.weight"),
                      ("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight")):
        assert got[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert torch.equal(torch.from_numpy(got[name].data.copy()).reshape(hf[key].shape), hf[key].float())


def test_q8_0_within_block_error(model_dir, tmp_path):
    out = tmp_path / "q.gguf"
    r = export_gguf(model_dir, out, "q8_0", progress=False)
    assert r["notes"] == []
    reader = gguf.GGUFReader(out)
    got = {t.name: t for t in reader.tensors}
    t = got["blk.0.ffn_up_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    ref = torch.stack([_hf_tensors(model_dir)[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]
                       for e in range(SPEC.experts)]).float()
    # Q8_0: per block of 32, d = max|x| / 127, q = round(x / d) in [-127, 127], stored d rounded to fp16
    # (relative 2^-11): |x - q·d16| <= d/2 + 127·d·2^-11 < 0.5625·d.
    blocks = ref.reshape(-1, 32)
    bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * 0.5625 + 1e-7
    err = (deq.reshape(-1, 32) - blocks).abs()
    assert (err <= bound).all() and err.max() > 0  # quantized (not a copy), and within the block bound
    export_gguf(model_dir, tmp_path / "b.gguf", "bf16", progress=False)
    assert out.stat().st_size < 0.7 * (tmp_path / "b.gguf").stat().st_size


def test_bad_configs_refused_together_nothing_written(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(norm_topk_prob=False, mlp_only_layers=[1])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGUFExportError) as err:
        export_gguf(bad, tmp_path / "x.gguf", progress=False)
    assert "norm_topk_prob=false" in str(err.value) and "mlp_only_layers" in str(err.value)
    assert not list(tmp_path.glob("*x.gguf*"))
    assert gguf_main([str(bad), str(tmp_path / "x.gguf")]) == 1


# Fresh interpreter: import everything first, then measure how far the export lifts peak RSS (VmHWM; see
# tests/test_merge_stream.py for why not ru_maxrss).
CHILD = r"""
import json, re, sys
import gguf, numpy, psutil, safetensors.torch, torch, tqdm, transformers
from qwen_sft.export.gguf_export import export_gguf
baseline = psutil.Process().memory_info().rss
if sys.argv[3] == "vocab":  # the fixed cost alone: the tokenizer as llama.cpp's token list + merges
    from qwen_sft.export.gguf_export import _vocab
    tokens = _vocab(sys.argv[1], 151936)
    special = gguf.SpecialVocab(sys.argv[1], load_merges=True)
else:
    export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"baseline": baseline, "peak": peak}))
"""


@pytest.mark.slow  # writes a ~220 MiB sharded checkpoint and exports it twice in subprocesses
def test_peak_rss_is_one_tensor_not_the_model(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    from qwen_sft.merge.plan import read_base
    from qwen_sft.model.tiny import tiny_config
    from qwen_sft.tokenizer import offline_tokenizer_dir

    spec = TinySpec(layers=24, hidden=128, heads=4, kv_heads=2, head_dim=32, experts=64, active=2, moe_intermediate=128)
    base = tmp_path / "merged"
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(tiny_config(spec)).to(torch.bfloat16).save_pretrained(base, max_shard_size="16MB")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (base / name).write_bytes((offline_tokenizer_dir() / name).read_bytes())
    total = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total > 200 * 2**20
    largest = max(math.prod(shape) * 2 for shape, _ in read_base(base).info.values())

    def lifted(qtype: str) -> int:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(tmp_path / f"{qtype}.gguf"), qtype],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        return m["peak"] - m["baseline"]

    fixed = lifted("vocab")
    for qtype in ("bf16", "q8_0"):
        got = lifted(qtype)
        print(f"export-gguf {qtype} of {total / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB): peak RSS "
              f"+{got / 2**20:.0f} MiB, of which the tokenizer alone +{fixed / 2**20:.0f} MiB")
        # Beyond the tokenizer: the largest tensor read (mapped pages), its fp32/encoded copy and the stacked
        # buffer -- a few tensors, never the model (loading it would add >= total).
        assert got - fixed < 3 * largest < total
