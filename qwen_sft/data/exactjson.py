"""JSON parsing that never changes a value: orjson where it is exact, Python's json where it is not.

    from qwen_sft.data.exactjson import loads
    loads(b'{"n": 123456789012345678901234567890}')   # {'n': 123456789012345678901234567890}, not 1.23e+29

orjson turns an integer past 64 bits into a float without a word, and refuses nesting past 1024 levels. A line
holding a run of 19 or more digits (the shortest integer that may not fit in 64 bits) is parsed by Python's json
instead, which keeps integers exact; so is a line orjson refuses, in case it is valid JSON that orjson cannot
hold. ``NaN`` and ``Infinity`` are not JSON and are refused by both paths. Every failure raises
``orjson.JSONDecodeError`` (a ``ValueError``), so callers need one ``except``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Every digit becomes b"1" and every other byte b"0", so a run of 19 digits is a plain substring search:
# C speed (a 50 MB line in tens of milliseconds), where the regex \d{19} took seconds.
_DIGIT_MAP = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_RUN = b"1" * 19


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def needs_exact(data: bytes | str) -> bool:
    """True when orjson might turn an integer in ``data`` into a float."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return _RUN in data.translate(_DIGIT_MAP)


def loads(data: bytes | str) -> Any:
    """Parse one JSON value exactly; raise orjson.JSONDecodeError for anything that is not (holdable) JSON."""
    if not needs_exact(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as err:
            first = err
    else:
        first = None
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise first or orjson.JSONDecodeError("invalid UTF-8", "", 0) from None
    except RecursionError:
        raise orjson.JSONDecodeError("nested too deeply to parse", "", 0) from None
    except ValueError as err:
        if first is not None:
            raise first from None
        raise orjson.JSONDecodeError(str(err), "", 0) from None
