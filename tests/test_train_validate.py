"""The seed interface and the one validation pass: adapter folders, typed values, every conflict at once,
the same message and exit code from `python train.py` and `qwen-sft train`, weights missing found up front.

    python -m pytest -q tests/test_train_validate.py
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from qwen_sft.train.args import parse_flags, parse_yaml
from qwen_sft.train.validate import ConfigError

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "Qwen/Qwen3-Coder-30B-A3B-Instruct"


def _train_py():
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"input_ids": [151644, 872, 198, 14990], "label": [-100, -100, 198, 14990]}) + "\n",
                    encoding="utf-8")
    return path


def _yaml(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


# --- peft_config_path ------------------------------------------------------------------------------------


def test_peft_config_path_is_a_folder_or_the_file(tmp_path):
    from qwen_sft.train.model import read_lora_config

    folder = read_lora_config(str(REPO / "configs/lora"))
    assert folder == read_lora_config(str(REPO / "configs/lora/adapter_config.json"))
    assert folder["target_modules"][:2] == ["q_proj", "k_proj"] and folder["r"] == 8
    with pytest.raises(FileNotFoundError, match=r"^peft_config_path=.*nope: no such file or directory"):
        read_lora_config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        read_lora_config(str(tmp_path))


def test_train_py_reads_the_adapter_folder_and_refuses_a_missing_one(tiny_model_dir, data, tmp_path, capsys):
    common = ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--use_peft", "true",
              "--torch_dtype", "float32", "--use_cpu", "true", "--dry_run", "true", "--output_dir", str(tmp_path / "o"),
              "--data_cache_dir", str(tmp_path / "cache")]
    train = _train_py()
    assert train.main([*common, "--peft_config_path", str(REPO / "configs/lora")]) == 0
    assert "dry run: config and data valid" in capsys.readouterr().out
    assert train.main([*common, "--peft_config_path", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["train.py: 1 problem in the configuration (nothing was loaded):",
                   f"  - peft_config_path={tmp_path / 'missing'}: no such file or directory (give a folder with "
                   f"adapter_config.json, e.g. configs/lora, or the file itself)"]


def test_scripts_pass_the_adapter_folder():
    import re

    import yaml

    for script in ("qlora_qwen3_30b.sh", "sft_qwencoder_with_lora.sh"):
        text = (REPO / "scripts" / script).read_text()
        # The scripts run their recipe (configs/train/*.yaml, its one source): the folder is set there.
        recipe = re.search(r"^RECIPE=(\S+)$", text, re.M).group(1)
        assert yaml.safe_load((REPO / recipe).read_text())["peft_config_path"] == "configs/lora", script


# --- typed values ------------------------------------------------------------------------------------------


def test_a_quoted_false_is_false(tmp_path):
    config = parse_yaml(str(_yaml(tmp_path, use_qlora="false", strict="no")), ["packing='false'"])
    assert config.model.use_qlora is False and config.model.use_peft is False
    assert config.data.strict is False and config.data.packing is False


def test_bad_values_are_all_reported_before_anything_loads(tmp_path):
    path = _yaml(tmp_path, use_qlora="maybe", learning_rate="fast", per_device_train_batch_size=0)
    with pytest.raises(ConfigError) as err:
        parse_yaml(str(path), ["gradient_accumulation_steps=0", "model_max_length=1.5", "lerning_rate=1"])
    assert err.value.problems[:6] == [
        "unknown option(s) ['lerning_rate']; see `python train.py --help` for the list",
        "learning_rate: expected a number, got 'fast' (str)",
        "use_qlora: expected true or false, got 'maybe' (str)",
        "model_max_length: expected an integer, got 1.5 (float)",
        "per_device_train_batch_size=0: must be >= 1",
        "gradient_accumulation_steps=0: must be >= 1",
    ]
    with pytest.raises(ConfigError, match=r"learning_rate=-0.0001: must be > 0"):
        parse_flags(["--learning_rate", "-1e-4"])


def test_flags_and_yaml_type_the_same_way(tmp_path):
    flags = parse_flags(["--use_qlora", "false", "--learning_rate", "2e-4", "--report_to", "tensorboard",
                         "--gradient_checkpointing", "--no_packing", "--max_steps", "7"])
    cfg = parse_yaml(str(_yaml(tmp_path, use_qlora=False, learning_rate="2e-4", report_to="tensorboard",
                               gradient_checkpointing=True, packing=False, max_steps=7)), [])
    for a, b in ((flags.model, cfg.model), (flags.data, cfg.data)):
        assert a == b
    assert flags.training.learning_rate == cfg.training.learning_rate == 2e-4
    assert flags.training.report_to == cfg.training.report_to == ["tensorboard"]
    assert flags.training.gradient_checkpointing is cfg.training.gradient_checkpointing is True
    assert flags.training.max_steps == cfg.training.max_steps == 7


# --- one pass, the same message from both entry points -----------------------------------------------------


def test_both_entry_points_give_the_same_problems_and_exit_2(tiny_model_dir, data, tmp_path, capsys):
    """The issue's reproduction: `train.py --strict true --truncate_source true --dry_run true` was a
    traceback from inside HfArgumentParser; `qwen-sft train` exited 2. Both now list every problem."""
    from qwen_sft.train.cli import main as cli_main

    opts = {"model_name_or_path": str(tiny_model_dir), "data_path": str(data), "torch_dtype": "float32",
            "use_cpu": "true", "output_dir": str(tmp_path / "o"), "data_cache_dir": str(tmp_path / "cache"),
            "strict": "true", "truncate_source": "true", "dry_run": "true", "use_qlora": "true",
            "bnb_4bit_quant_type": "fp4", "router_aux_loss_coef": "-0.5", "peft_config_path": str(REPO / "configs/lora"),
            "deepspeed": str(REPO / "configs/default_offload_opt_param.json")}
    assert _train_py().main([x for k, v in opts.items() for x in (f"--{k}", v)]) == 2
    flag_err = capsys.readouterr().err
    config = _yaml(tmp_path, model_name_or_path=str(tiny_model_dir))
    assert cli_main([str(config), *(f"{k}={v}" for k, v in opts.items())]) == 2
    yaml_err = capsys.readouterr().err
    assert flag_err.startswith("train.py: ") and yaml_err.startswith("qwen-sft train: ")
    body = flag_err.removeprefix("train.py: ")
    assert body == yaml_err.removeprefix("qwen-sft train: ")
    assert body.splitlines()[1:] == [
        "  - router_aux_loss_coef must be >= 0, got -0.5",
        "  - strict=True (fail on over-long samples) contradicts truncate_source=True (cut them): choose one",
        "  - use_qlora with torch_dtype=float32 but bnb_4bit_compute_dtype=bfloat16: choose one precision for the "
        "non-quantized layers",
        f"  - expert_engine=True (the default for LoRA/QLoRA on an MoE model) does not run under DeepSpeed ZeRO-3 "
        f"(deepspeed={opts['deepspeed']}): use --deepspeed configs/zero2.json, or --expert_engine false (stock "
        f"peft, experts in 16-bit)",
        "  - expert_engine=True stores the experts in NF4 only, got bnb_4bit_quant_type=fp4: use nf4, or "
        "--expert_engine false",
    ]


def test_engine_under_zero3_fails_the_dry_run(tiny_model_dir, data, tmp_path):
    """DRY_RUN=1 used to call this valid, and model loading then refused it."""
    from qwen_sft.train.run import run

    config = parse_yaml(str(_yaml(tmp_path, model_name_or_path=str(tiny_model_dir), data_path=str(data),
                                  torch_dtype="float32", use_cpu=True, use_peft=True, dry_run=True,
                                  peft_config_path=str(REPO / "configs/lora"), data_cache_dir=str(tmp_path / "c"),
                                  deepspeed=str(REPO / "configs/default_offload_opt_param.json"))), [])
    with pytest.raises(ConfigError, match="does not run under DeepSpeed ZeRO-3"):
        run(config)
    assert not (tmp_path / "c").exists()  # the data was not read


def test_lora_targets_that_match_nothing_fail_before_the_weights_load(tiny_model_dir, data, tmp_path, monkeypatch,
                                                                     capsys):
    from qwen_sft.train.cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj", "qkv", "w1"]}))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    config = _yaml(tmp_path, model_name_or_path=str(tiny_model_dir), data_path=str(data), torch_dtype="float32",
                   use_cpu=True, use_peft=True, peft_config_path=str(adapter), output_dir=str(tmp_path / "o"),
                   data_cache_dir=str(tmp_path / "c"))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert f"peft_config_path={adapter}: LoRA targets ['qkv', 'w1'] match nothing in the model" in err
    assert "q_proj" in err.split("its modules:")[1] and not (tmp_path / "c").exists()


# --- model download policy -----------------------------------------------------------------------------------


def _half_cache(hub: Path, tiny_model_dir: Path) -> Path:
    """A Hugging Face cache holding the model id's config and tokenizer but no weights."""
    repo = hub / ("models--" + MODEL_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_weights_missing_offline_stops_first_with_the_download_command(tiny_model_dir, tmp_path, monkeypatch,
                                                                      capsys):
    from qwen_sft.train.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    _half_cache(hub, tiny_model_dir)
    raw = tmp_path / "raw.jsonl"  # not tokenized: reading it would be a data error (exit 1)
    raw.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    config = _yaml(tmp_path, model_name_or_path=MODEL_ID, cache_dir=str(hub), use_qlora=True, torch_dtype="float32",
                   bnb_4bit_compute_dtype="float32", use_cpu=True, data_path=str(raw),
                   peft_config_path=str(REPO / "configs/lora"), output_dir=str(tmp_path / "o"),
                   data_cache_dir=str(tmp_path / "c"))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert (f"model_name_or_path={MODEL_ID}: config.json but no weights (no model.safetensors or "
            f"model.safetensors.index.json) in the cache {hub}, and HF_HUB_OFFLINE=1 forbids downloading; download "
            f"it first: hf download {MODEL_ID} --cache-dir {hub}") in err
    assert not (tmp_path / "c").exists()


def test_dry_run_rehearses_without_weights_and_warns(tiny_model_dir, tmp_path, monkeypatch):
    """Offline, config and tokenizer cached, no weights: a real run stops (above); a dry run, which never loads
    weights, goes on and says what the real run will do."""
    from qwen_sft.train.validate import _model_problems, coerce, with_defaults

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    _half_cache(hub, tiny_model_dir)
    raw = {"model_name_or_path": MODEL_ID, "cache_dir": str(hub), "use_qlora": True,
           "peft_config_path": str(REPO / "configs/lora")}
    for dry_run in (False, True):
        problems: list[str] = []
        info = _model_problems(with_defaults(coerce({**raw, "dry_run": dry_run})[0]), problems)
        if dry_run:
            assert problems == [] and info["engine"] is True
            assert info["warning"].startswith(f"model_name_or_path={MODEL_ID}: config.json but no weights")
            assert info["warning"].endswith("the real run will stop or download)")
        else:
            assert len(problems) == 1 and "HF_HUB_OFFLINE=1 forbids downloading" in problems[0]
            assert info["warning"] is None


def test_weights_missing_online_are_downloaded_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from qwen_sft.train import download

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub = tmp_path / "hub"
    snapshot = _half_cache(hub, tiny_model_dir)
    found = download.locate_model(MODEL_ID, str(hub))
    assert (found.directory, found.problem, found.download) == (snapshot, None, MODEL_ID)

    calls = []

    def fake_snapshot_download(repo_id, cache_dir=None, **kwargs):  # what the Hub would add: the weights
        calls.append((repo_id, cache_dir, kwargs))
        shutil.copy(tiny_model_dir / "model.safetensors", snapshot / "model.safetensors")
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert download.download_model(MODEL_ID, str(hub)) == snapshot
    assert calls == [(MODEL_ID, str(hub), {})]  # the whole repository, huggingface_hub's progress bars on
    assert download.locate_model(MODEL_ID, str(hub)).download is None

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(ConfigError, match=rf"could not download {MODEL_ID} \(ConnectionError: Failed to resolve "
                                          rf"'huggingface.co'\); download it by hand: hf download {MODEL_ID} "):
        download.download_model(MODEL_ID, str(hub))


def test_dataclasses_built_in_python_parse_the_same_way():
    from qwen_sft.train.args import DataArguments, ModelArguments

    args = ModelArguments(use_qlora="false", router_aux_loss_coef="0.01")
    assert args.use_qlora is False and args.use_peft is False and args.router_aux_loss_coef == 0.01
    with pytest.raises(ConfigError, match="strict=True.*truncate_source=True"):
        DataArguments(strict="yes", truncate_source=True)
