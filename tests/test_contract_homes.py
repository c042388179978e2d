"""Each contract has one home: a scan of qwen_sft/ (and bench/) fails when a copy of one comes back.

    python -m pytest -q tests/test_contract_homes.py

Sample contract: qwen_sft/samples/ (ignore index, column names and schema, writer, reader, memory-mapped
dataset, the length rule). Checkpoint contract: qwen_sft/model/checkpoint.py (resolving a model id or
directory and the download policy, the weight map, the adapter and weight file names, per-expert key names,
peft's adapter key prefix, which fused expert parameter a nested LoRA pair adapts, peft's expert LoRA layout).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = "qwen_sft/samples/"
CHECKPOINT = "qwen_sft/model/checkpoint.py"
CHECKPOINT_FILES = {"adapter_config.json": "ADAPTER_CONFIG", "adapter_model.safetensors": "ADAPTER_WEIGHTS",
                    "model.safetensors": "SINGLE_FILE"}
# Names the checkpoint contract defines; a second assignment of one is a second copy of the value.
CHECKPOINT_CONSTANTS = ("PEFT_PREFIX", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CONFIG_FILE", "WEIGHTS_FILE", "INDEX_FILE",
                        "SINGLE_FILE", "EXPERTS", "FUSED_EXPERT_PARAMS", "TARGET_PARAMETERS", "EXPERT_TARGET_PARAMETERS")


def _sources() -> list[tuple[str, ast.AST]]:
    files = sorted([*(REPO / "qwen_sft").rglob("*.py"), *(REPO / "bench").rglob("*.py")])
    assert len(files) > 50  # the scan found the package
    return [(f.relative_to(REPO).as_posix(), ast.parse(f.read_text(encoding="utf-8"))) for f in files]


def _strings(tree: ast.AST):
    """String constants that are not docstrings, with the f-strings' literal parts."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def _names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id, node
        elif isinstance(node, ast.Attribute):
            yield node.attr, node
        elif isinstance(node, ast.alias):
            yield node.name.rsplit(".", 1)[-1], node


def _offences(rule) -> list[str]:
    return [f"{path}:{getattr(node, 'lineno', '?')}: {what}" for path, tree in _sources() for what, node in rule(path, tree)]


def _ignore_index(path, tree):
    if path == SAMPLES + "__init__.py":
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                and node.operand.value == 100:
            yield "-100 literal: import IGNORE_INDEX from qwen_sft.samples", node


def _sample_schema(path, tree):
    if path.startswith((SAMPLES, "qwen_sft/data/")):  # data/ reads raw records, whose own "label" keys are not ours
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "schema":
            if any(isinstance(c, ast.Constant) and c.value in ("input_ids", "label") for c in ast.walk(node)):
                yield "an Arrow schema of the sample columns: use qwen_sft.samples.files.SCHEMA", node
    for node in ast.walk(tree):  # a sample row built or read by hand ({"input_ids": …, "label": …}, row["label"])
        keys = [k.value for k in node.keys if isinstance(k, ast.Constant)] if isinstance(node, ast.Dict) else []
        if "input_ids" in keys and "label" in keys or isinstance(node, ast.Subscript) \
                and isinstance(node.slice, ast.Constant) and node.slice.value == "label":
            yield "a sample row by hand: use qwen_sft.samples.files (LABEL, jsonl_rows, iter_samples)", node


def _checkpoint(path, tree):
    if path == CHECKPOINT:
        return
    for node in _strings(tree):
        text = node.value
        if text == "weight_map":
            yield "weight_map parsed outside the checkpoint contract: use read_index / weight_map", node
        if text == "model.safetensors.index.json":
            yield "the index file named by hand: use INDEX_FILE / read_index", node
        if re.search(r"experts\\\.|experts\\.\(|\\d\+\)?\\\.(gate|up|down)_proj", text):
            yield "an expert key pattern: use parse_expert_key", node
        if re.fullmatch(r"\.(gate_proj|up_proj|down_proj)\.weight", text):
            yield "a per-expert key built by hand: use expert_key", node
        if text.strip(".") == "base_model.model":
            yield "peft's key prefix by hand: use PEFT_PREFIX / lora_key / split_lora_key", node
        if "base_layer.lora_" in text:
            yield "peft's nesting of expert LoRA by hand: use lora_key with expert_lora_depth / expert_lora_param", node
        if text.strip("./") in CHECKPOINT_FILES:
            yield f"{text.strip('./')} named by hand: use {CHECKPOINT_FILES[text.strip('./')]}", node
        if re.fullmatch(r"\.?mlp\.experts(\.(gate_up_proj|down_proj))?\.?", text):
            yield "the experts module named by hand: use EXPERTS / in_experts / EXPERT_TARGET_PARAMETERS", node
    for name, node in _names(tree):
        if name in ("snapshot_download", "try_to_load_from_cache"):
            yield f"{name}: resolve models with qwen_sft.model.checkpoint (one download policy)", node
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "permute" \
                and [getattr(a, "value", None) for a in node.args] in ([2, 0, 1], [1, 2, 0]):
            yield "peft's expert LoRA reshape: use factor_from_peft / peft_to_per_expert", node
    for node in _strings(tree):
        if node.value in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            yield "the offline switch read outside the download policy: use hub_offline", node


def _one_definition(path, tree):
    """The contract's own names are defined once (imports and re-exports are fine)."""
    homes = {"IGNORE_INDEX": SAMPLES + "__init__.py", "SampleWriter": SAMPLES + "files.py",
             "iter_samples": SAMPLES + "files.py", "TokenizedDataset": SAMPLES + "dataset.py",
             "to_arrow": SAMPLES + "dataset.py", "cut_to_length": SAMPLES + "length.py",
             "resolve_model_dir": CHECKPOINT, "locate_model": CHECKPOINT, "missing_weights": CHECKPOINT,
             "weight_map": CHECKPOINT, "factor_from_peft": CHECKPOINT, "factor_to_peft": CHECKPOINT,
             "lora_key": CHECKPOINT, "split_lora_key": CHECKPOINT, "expert_lora_params": CHECKPOINT,
             "expert_lora_depth": CHECKPOINT, "expert_lora_param": CHECKPOINT, "in_experts": CHECKPOINT,
             "is_experts_module": CHECKPOINT, "parse_expert_key": CHECKPOINT, "expert_key": CHECKPOINT}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in homes and homes[node.name] != path:
            yield f"{node.name} defined again (its home is {homes[node.name]})", node
        if isinstance(node, ast.Assign) and path != homes.get("IGNORE_INDEX"):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id in ("IGNORE", "IGNORE_INDEX"):
                    yield f"{t.id} assigned (its home is qwen_sft/samples/__init__.py)", node
        if isinstance(node, ast.Assign) and path != CHECKPOINT:
            for t in node.targets:
                for name in (e for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)):
                    if name.id in CHECKPOINT_CONSTANTS:
                        yield f"{name.id} assigned (its home is {CHECKPOINT})", node


@pytest.mark.parametrize("rule", [_ignore_index, _sample_schema, _checkpoint, _one_definition],
                         ids=["ignore-index", "sample-schema", "checkpoint", "one-definition"])
def test_no_copy_of_a_contract_outside_its_home(rule):
    assert _offences(rule) == []


def test_the_guard_sees_the_old_copies():
    """Each rule flags the kind of line it is there to keep out (so an empty result above means something)."""
    old = {
        "qwen_sft/x.py": ("IGNORE = -100\nSCHEMA = pa.schema([('input_ids', t), ('label', t)])\nlab = row['label']\n"
                          "wm = json.loads(index.read_text())['weight_map']\n"
                          "_PER = re.compile(r'^(?P<block>.+\\.mlp)\\.experts\\.(?P<e>\\d+)\\.(gate_proj)\\.weight$')\n"
                          "from huggingface_hub import snapshot_download\n"
                          "B3 = B.reshape(out, -1, E).permute(2, 0, 1)\n"
                          "def iter_samples(path): ...\n"),
    }
    tree = ast.parse(old["qwen_sft/x.py"])
    found = {rule.__name__: [w for w, _ in rule("qwen_sft/x.py", tree)]
             for rule in (_ignore_index, _sample_schema, _checkpoint, _one_definition)}
    assert len(found["_ignore_index"]) == 1
    assert len(found["_sample_schema"]) == 2  # the schema call and row["label"]
    assert sorted(w.split(":")[0] for w in found["_checkpoint"]) == sorted(
        ["weight_map parsed outside the checkpoint contract", "an expert key pattern", "snapshot_download",
         "peft's expert LoRA reshape"])
    assert len(found["_one_definition"]) == 2  # IGNORE assigned, iter_samples defined again


def test_the_guard_sees_the_old_adapter_key_copies():
    """The lines the checkpoint contract replaced in moe/lora.py, merge/adapter.py, export/vllm_adapter.py and
    train/ (a key table, the literal prefix, hand-named files, the experts module and the nesting rule)."""
    old = ("TARGET_PARAMETERS = ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']\n"
           "_PEFT_KEYS = {'lora_gate_up_A': 'base_layer.lora_A.weight', 'lora_down_A': 'lora_A.weight'}\n"
           "key = f'base_model.model.{path}.{infix}'\n"
           "WEIGHTS_FILE = 'adapter_model.safetensors'\n"
           "cfg = json.loads((adapter_dir / 'adapter_config.json').read_text())\n"
           "experts = [k for k in keys if '.mlp.experts.' in k]\n"
           "def expert_lora_param(module, depth, targets): return targets[len(targets) - 1 - depth]\n")
    tree = ast.parse(old)
    found = sorted(w.split(":")[0] for rule in (_checkpoint, _one_definition) for w, _ in rule("qwen_sft/x.py", tree))
    assert found == sorted([
        "the experts module named by hand", "the experts module named by hand",  # both target_parameters
        "peft's nesting of expert LoRA by hand", "peft's key prefix by hand",
        "adapter_model.safetensors named by hand", "adapter_config.json named by hand",
        "the experts module named by hand",  # '.mlp.experts.' in k
        "TARGET_PARAMETERS assigned (its home is qwen_sft/model/checkpoint.py)",
        "WEIGHTS_FILE assigned (its home is qwen_sft/model/checkpoint.py)",
        "expert_lora_param defined again (its home is qwen_sft/model/checkpoint.py)"])
