"""Setup the end-to-end tests share: tokenized training rows, a free port, a subprocess that dies whole.

    from helpers import free_port, run_group, write_conversations
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

IM_END = 151645
WORDS = "def return value list for loop python code function class import print sort key".split()


def write_conversations(path: Path, tok, rows: int, *, two_turn: bool = False) -> Path:
    """``rows`` short random conversations as tokenized JSONL with assistant-only labels (seeded: same every run).

    Single-turn rows: a 6-word question, a 3-12-word answer. ``two_turn``: one or two turns of 3-20 words asked and
    3-30 answered, each turn followed by an unsupervised "\\n" as the chat template writes it.
    """
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            ids: list[int] = []
            labels: list[int] = []
            for _turn in range(rng.randint(1, 2) if two_turn else 1):
                user = " ".join(rng.choices(WORDS, k=rng.randint(3, 20) if two_turn else 6))
                prompt = tok.encode(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
                answer = tok.encode(" ".join(rng.choices(WORDS, k=rng.randint(3, 30 if two_turn else 12)))) + [IM_END]
                newline = tok.encode("\n") if two_turn else []
                ids += prompt + answer + newline
                labels += [-100] * len(prompt) + answer + [-100] * len(newline)
            fh.write(json.dumps({"input_ids": ids, "label": labels}) + "\n")
    return path


def free_port() -> str:
    """A free local port: torchrun's --master_port 0 leaves the workers waiting on port 0 forever."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run_group(cmd: list[str], env: dict, cwd: Path, timeout: int) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``cmd`` run in its own process group, so that a timeout also ends
    torchrun's workers; a timeout fails the test with the output's tail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}")
    return proc.returncode, out


# Per-expert MoE experts (the Hub / vLLM layout), for export tests of both architectures.
class Expert(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerExpertExperts(torch.nn.ModuleList):
    """Drop-in for transformers' fused Qwen3MoeExperts: same call, one torch.nn.Linear triple per expert."""

    def __init__(self, config):
        from transformers.activations import ACT2FN

        super().__init__(Expert(config.hidden_size, config.moe_intermediate_size, ACT2FN[config.hidden_act])
                         for _ in range(config.num_experts))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel():
                y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, pos, None]
                out.index_add_(0, token_idx, y.to(out.dtype))
        return out
