"""libpq connection strings (key=value or URI), parsed as libpq would: pure string work.

Cluster data is input: repmgr.nodes.conninfo decides which host a node is, so a malformed
row must be caught here, with the key to fix, rather than crash a hook later.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from repmgr_vip.core.errors import ConfigError


def parse_conninfo(conninfo: str) -> dict[str, str]:
    """Parses a libpq conninfo (key=value form or URI) into a dict.

    Anything libpq would reject (an unclosed quote or `[`, a port outside 1..65535) raises
    ConfigError naming the problem; the message never repeats the conninfo (it may hold a
    password).
    """
    text = conninfo.strip()
    if text.startswith(("postgresql://", "postgres://")):
        result = _parse_uri(text)
    else:
        result = _parse_key_values(text)
    _check_conninfo_values(result)
    return result


def _parse_uri(text: str) -> dict[str, str]:
    try:
        parts = urlsplit(text)
        result: dict[str, str] = {}
        if parts.hostname:
            result["host"] = unquote(parts.hostname)
        if parts.port:
            result["port"] = str(parts.port)
        if parts.username:
            result["user"] = unquote(parts.username)
        if parts.path.strip("/"):
            result["dbname"] = unquote(parts.path.lstrip("/"))
        result.update(parse_qsl(parts.query))
    except ValueError as exc:
        raise ConfigError(f"conninfo URI is malformed ({exc}); fix conninfo") from exc
    return result


def _parse_key_values(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        eq = text.find("=", i)
        key = text[i:eq].strip() if eq >= 0 else ""
        if eq < 0 or not key or any(ch.isspace() for ch in key):
            word = text[i:].split(None, 1)[0]
            raise ConfigError(f"conninfo: expected key=value at {word!r}; fix conninfo")
        i = eq + 1
        while i < len(text) and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < len(text) and text[i] == "'":
            i += 1
            while i < len(text) and text[i] != "'":
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                value.append(text[i])
                i += 1
            if i >= len(text):
                raise ConfigError(f"conninfo: the quoted value of {key} is not closed; "
                                  "fix conninfo")
            i += 1
        else:
            while i < len(text) and not text[i].isspace():
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                value.append(text[i])
                i += 1
        result[key] = "".join(value)
    return result


def _check_conninfo_values(values: Mapping[str, str]) -> None:
    for port in values.get("port", "").split(","):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"conninfo: port {port!r} is not 1..65535; fix conninfo")
    host = values.get("host", "")
    if "[" in host or "]" in host:
        raise ConfigError(f"conninfo: host {host!r} is malformed (no brackets in "
                          "host=...); fix conninfo")
