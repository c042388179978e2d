"""Keep secrets off disk and off the console: any option whose name says token / key / secret / password.

    from qwen_sft.redact import is_secret_name, redact_line, secrets_hidden
    with secrets_hidden(trainer.args):      # training_args.bin is pickled inside; the push still gets the token
        trainer._save(out)

Names are split on ``_`` so ``hub_token`` and ``wandb_api_key`` are secrets while ``include_tokens_per_second``
(a flag about counting tokens) is not; only string values are hidden (a boolean is never a secret).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator

SECRET_WORDS = {"token", "key", "secret", "password", "passwd", "apikey", "credentials"}
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_WORDS & set(name.lower().replace("-", "_").split("_")))


def is_secret(name: str, value: object) -> bool:
    return is_secret_name(name) and isinstance(value, str) and value != ""


def redact_mapping(values: dict) -> dict:
    """A copy without the secret entries' values."""
    return {k: (REDACTED if is_secret(str(k), v) else v) for k, v in values.items()}


_LINE = re.compile(r"^(\s*)([A-Za-z0-9_.-]+)(\s*=\s*)(.*?)(\s+\([^()]*\))?$")


def redact_line(line: str) -> str:
    """``  hub_token = 'hf_x'  (flag)`` → ``  hub_token = <redacted>  (flag)`` (describe()'s provenance lines)."""
    m = _LINE.match(line)
    if not m or not is_secret_name(m.group(2)) or m.group(4) in ("None", "''", '""', "False", "True"):
        return line
    return f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}{m.group(5) or ''}"


@contextlib.contextmanager
def secrets_hidden(obj) -> Iterator[list[str]]:
    """Blank the secret string fields of a dataclass (TrainingArguments) for the duration; yields their names."""
    names = [f.name for f in dataclasses.fields(obj) if is_secret(f.name, getattr(obj, f.name, None))]
    saved = {n: getattr(obj, n) for n in names}
    try:
        for n in names:
            setattr(obj, n, None)
        yield names
    finally:
        for n, v in saved.items():
            setattr(obj, n, v)
