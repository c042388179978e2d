"""The seed scripts' environment variables, defaulted from their recipe (configs/train/*.yaml).

    eval "$(python -m qwen_sft.train.recipe configs/train/lora_zero2_qwen3_30b.yaml MICRO_BATCH=per_device_train_batch_size)"

prints ``NAME='value'`` for every ``NAME=key`` whose variable is not set in the environment, so that a variable
the user sets wins and the default is written only in the recipe. Reads YAML only (no torch): the scripts call
it before torchrun starts.
"""

from __future__ import annotations

import os
import shlex
import sys

from qwen_sft.train.args import read_yaml


def shell_defaults(recipe: str, pairs: list[str], environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = read_yaml(recipe)
    lines = []
    for pair in pairs:
        name, _, key = pair.partition("=")
        if not key:
            raise ValueError(f"{pair!r}: expected NAME=key")
        if environ.get(name):
            continue
        if key not in values:
            raise ValueError(f"{recipe} has no {key!r} (the default of {name})")
        value = values[key]
        text = "true" if value is True else "false" if value is False else str(value)
        lines.append(f"{name}={shlex.quote(text)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print("\n".join(shell_defaults(argv[0], argv[1:])))
    except (OSError, ValueError) as err:
        print(f"recipe: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
