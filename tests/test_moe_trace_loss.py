"""``qwen-sft estimate --trace`` traces the run's loss: the chunked loss by default (the run's loss_chunk_tokens),
transformers' full-logits loss with ``--loss full``, and checkpoint offload with ``--offload-activations``.

    python -m pytest -q tests/test_moe_trace_loss.py
"""

from __future__ import annotations

import json
import re

from qwen_sft.model.tiny import TinySpec, tiny_config
from qwen_sft.moe.estimate import main
from qwen_sft.train.args import RunArguments


def _rows(text: str) -> dict[str, float]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"(\S.*?)\s{2,}(-?[0-9]+\.[0-9]{3})\s", line)
        if m:
            rows[m[1]] = float(m[2])
    return rows


def test_trace_cli_traces_the_runs_loss(tmp_path, capsys):
    cfg = tiny_config(TinySpec(layers=2, hidden=64, experts=8, active=2, moe_intermediate=32))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    common = [str(tmp_path), "--mode", "qlora", "--seq", "128", "--trace", "--layers", "all"]
    outs = {}
    for name, extra in {"default": [], "full": ["--loss", "full"],
                        "offload": ["--loss-chunk-tokens", "16", "--offload-activations"]}.items():
        assert main(common + extra) == 0
        outs[name] = capsys.readouterr().out
    assert f"chunked loss of {RunArguments().loss_chunk_tokens} tokens" in outs["default"]
    assert "full-logits loss" in outs["full"] and "chunked loss of 16 tokens, offload_activations" in outs["offload"]
    rows = {k: _rows(v) for k, v in outs.items()}
    loss, peak = "loss/logits (forward + backward at the loss)", "peak allocated per GPU (at the backward)"
    # 127 supervised tokens x 151,936 logits: one chunk holds them all at the default chunk (as many bytes as the
    # full loss's logits), 16 of them with --loss-chunk-tokens 16
    assert rows["full"][loss] > 0.2 and rows["default"][loss] > 0.2
    assert rows["default"][loss] > 4 * rows["offload"][loss]
    assert rows["default"][peak] > rows["offload"][peak]


def test_rehearsal_traces_the_runs_offload():
    import torch

    from qwen_sft.trace.rehearse import _run_loss

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return type("Out", (), {"loss": (x * self.w).sum()})()

    packed: list = []  # what the offload hook packs: (device, the host-side copy), spied on
    original = torch.autograd.graph.saved_tensors_hooks.__init__

    def spy(self, pack, unpack):
        original(self, lambda t: packed.append(pack(t)) or packed[-1], unpack)

    x = torch.randn(4)
    for offload in (False, True):
        packed.clear()
        r = RunArguments(chunked_loss=False, offload_activations=offload)
        torch.autograd.graph.saved_tensors_hooks.__init__ = spy
        try:
            if offload:
                _run_loss(r)(Model(), {"x": x})
        finally:
            torch.autograd.graph.saved_tensors_hooks.__init__ = original
        assert (_run_loss(r) is None) == (not offload)  # the model's own loss, untouched, without offload
    assert packed and all(device.type == "cpu" and t.device.type == "meta" for device, t in packed)
