"""Training refuses data tokenized with a chat template other than the one it saves beside the adapter.

    python -m pytest -q tests/test_train_template.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen_sft.tokenize.pipeline import tokenize_chatml_file

REPO = Path(__file__).resolve().parent.parent
OTHER_TEMPLATE = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content | trim + '<|im_end|>\\n' }}"
                  "{%- endfor %}")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chatml") / "chatml.jsonl"
    rec = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": " 5 "}]}
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    return path


def _train(tiny_model_dir: Path, data: Path, tmp_path: Path, *extra: str) -> int:
    from qwen_sft.train.cli import main

    return main([str(REPO / "configs/train/lora_tiny_cpu.yaml"), f"model_name_or_path={tiny_model_dir}",
                 f"data_path={data}", f"output_dir={tmp_path / 'out'}", f"data_cache_dir={tmp_path / 'cache'}",
                 f"peft_config_path={REPO / 'configs/lora/adapter_config.json'}", "dry_run=true", *extra])


def test_data_from_another_template_is_refused_before_the_model_loads(tiny_model_dir, chatml, tmp_path, capsys):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = json.loads((other / "tokenizer_config.json").read_text(encoding="utf-8"))
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": OTHER_TEMPLATE}))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "train.jsonl"
    tokenize_chatml_file(chatml, data, model=str(other), progress=False)
    assert _train(tiny_model_dir, data, tmp_path) == 1
    err = capsys.readouterr().err
    assert "made with another chat template (1):" in err and f"tokenized with {str(other)!r}" in err
    assert "--allow_template_mismatch true" in err
    assert _train(tiny_model_dir, data, tmp_path, "allow_template_mismatch=true") == 0


def test_matching_template_trains_and_its_hash_is_in_the_data_statistics(tiny_model_dir, chatml, tmp_path):
    from qwen_sft.train.args import parse_yaml
    from qwen_sft.train.run import run

    data = tmp_path / "train.jsonl"
    stats = tokenize_chatml_file(chatml, data, model="offline", progress=False)  # the tiny model's tokenizer
    config = parse_yaml(str(REPO / "configs/train/lora_tiny_cpu.yaml"), [
        f"model_name_or_path={tiny_model_dir}", f"data_path={data}", f"output_dir={tmp_path / 'out'}",
        f"data_cache_dir={tmp_path / 'cache'}", f"peft_config_path={REPO / 'configs/lora/adapter_config.json'}",
        "dry_run=true"])
    record = run(config)["stats"]["train"]["tokenizer"]
    assert record["match"] is True and record["data"] == stats["tokenizer"]
    assert len(record["training"]["chat_template_sha256"]) == 64
