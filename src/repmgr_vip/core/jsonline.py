"""JSON for the promote hook's quick start, with the C halves of `json` only.

`json` itself loads `re` and `enum` (milliseconds of every hook's start-up, more on a host
busy with a failover); `_json`'s scanner and encoder do the same work. Used by the quick
start's talk with the daemon (cli/quick.py) and its read of the early-release plan
(adapters/early.py): dicts, lists, strings, numbers, booleans and None, nothing else.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # typing itself costs the hook milliseconds
if TYPE_CHECKING:
    from typing import Any


class _Context:
    """What _json's scanner reads from a json.JSONDecoder: strict, no hooks, no NaN."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not a value here")


def loads(line: bytes) -> object:
    """One JSON value, the whole line (as json.loads); ValueError otherwise."""
    text = line.decode().strip()
    scanner: Any = _json.make_scanner(_Context())  # type: ignore[arg-type]
    try:
        value, end = scanner(text, 0)
    except (StopIteration, RecursionError) as exc:
        raise ValueError("not JSON") from exc
    if end != len(text):
        raise ValueError("extra data after the value")
    return value


def dumps(value: object) -> str:
    """JSON of the hook's own messages: dicts, lists, strings, numbers, booleans, None."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        return float.__repr__(value)
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dumps(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dumps(str(key))}: {dumps(item)}"
                               for key, item in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not JSON")
