"""Benchmark: conversion + validation against the floor of reading and writing the same records with `json`.

    python bench/convert.py                      # 200k records, best of 3 runs each
    python bench/convert.py --records 1000000 --repeats 5

Generates a JSONL file of mixed shapes (OpenAI messages with tool calls, ShareGPT, Alpaca, input/output
pairs; Korean and English text), then times, in the same process and alternating runs:
  baseline  json.loads + json.dumps(ensure_ascii=False) per line, written to a file (no validation at all)
  json + fsync  the same, then fsync, as convert's atomic write does before its rename
  convert   qwen_sft.data.convert.convert_inputs: detection, conversion, validation, rejects, atomic write
and prints rows/s, MB/s (input bytes) and the ratio convert / baseline (> 1 means faster than the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from qwen_sft.data.convert import convert_inputs
from qwen_sft.data.options import ConvertOptions


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["def", "return", "list", "파이썬", "함수", "값을", "loop", "index", "문자열", "class", "import",
             "yield"]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append({"id": i, "messages": [
                {"role": "system", "content": "You are a coding assistant."},
                {"role": "user", "content": text(40)},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": "run", "arguments": json.dumps(
                        {"code": text(20)})}}]},
                {"role": "tool", "content": text(15), "tool_call_id": f"c{i}"},
                {"role": "assistant", "content": text(60)}],
                "tools": [{"type": "function", "function": {"name": "run", "description": "run code", "parameters": {
                    "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]})
        elif kind == 1:
            out.append({"conversations": [{"from": "human", "value": text(30)}, {"from": "gpt", "value": text(80)},
                                          {"from": "human", "value": text(10)}, {"from": "gpt", "value": text(40)}]})
        elif kind == 2:
            out.append({"instruction": text(25), "input": text(10) if i % 8 == 2 else "", "output": text(90)})
        else:
            out.append({"input": text(30), "output": text(70), "source": "synthetic"})
    return out


def baseline(src: Path, dst: Path, durable: bool = False) -> int:
    n = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(json.dumps(json.loads(line), ensure_ascii=False) + "\n")
            n += 1
        if durable:  # what atomic_open does before its rename: the bytes are on disk when the run says done
            fout.flush()
            os.fsync(fout.fileno())
    return n


def baseline_fsync(src: Path, dst: Path) -> int:
    return baseline(src, dst, durable=True)


def convert(src: Path, dst: Path) -> int:
    stats = convert_inputs([src], dst, ConvertOptions(progress=False), dst.with_suffix(".rejects.jsonl"))
    return sum(s.written for s in stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        with open(src, "w", encoding="utf-8") as fh:
            for rec in make_records(args.records):
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        mb = src.stat().st_size / 1e6
        runs = (("baseline (json)", baseline), ("json + fsync", baseline_fsync), ("convert", convert))
        best = {name: float("inf") for name, _ in runs}
        for _ in range(args.repeats):  # alternate so all see the same machine load
            for name, fn in runs:
                t0 = time.perf_counter()
                n = fn(src, Path(tmp) / f"{name[:4]}.jsonl")
                best[name] = min(best[name], time.perf_counter() - t0)
                assert n == args.records, (name, n)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}; {args.records} records, {mb:.1f} MB, best of {args.repeats}")
    for name, sec in best.items():
        print(f"{name:<16} {sec:7.2f} s  {args.records / sec:>10,.0f} rows/s  {mb / sec:7.1f} MB/s")
    print(f"convert / baseline speed ratio: {best['baseline (json)'] / best['convert']:.2f}x "
          f"(vs json + fsync, the same durability as convert: {best['json + fsync'] / best['convert']:.2f}x)")


if __name__ == "__main__":
    main()
