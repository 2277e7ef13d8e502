"""Reads repmgr.conf and libpq conninfo strings, so users never repeat them in our config.

repmgr's parser accepts `key=value`, `key = 'quoted value'` (with '' or \\' for a quote) and
`#` comments; we follow the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from repmgr_vip.core.conninfo import parse_conninfo
from repmgr_vip.core.errors import ConfigError

_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=?\s*(.*?)\s*$")


def _unquote_value(raw: str) -> str:
    if not raw.startswith("'"):
        return raw.split("#", 1)[0].strip()
    out: list[str] = []
    i = 1
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            out.append(raw[i + 1])
            i += 2
            continue
        if ch == "'":
            if raw[i + 1 : i + 2] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out)
        out.append(ch)
        i += 1
    raise ValueError("unterminated quoted value")


def parse_repmgr_conf_text(text: str, source: str = "repmgr.conf") -> dict[str, str]:
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(f"{source}:{lineno}: cannot parse {stripped!r}; expected key=value")
        key, raw = match.groups()
        try:
            values[key] = _unquote_value(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}:{lineno}: {exc} for {key}; close the quote") from exc
    return values


@dataclass(frozen=True)
class RepmgrConf:
    """The few repmgr.conf settings repmgr-vip needs."""

    path: Path
    node_id: int
    node_name: str
    conninfo: str
    data_directory: str
    pg_bindir: str
    repmgr_bindir: str
    ssh_options: str
    reconnect_attempts: int
    reconnect_interval: int
    raw: Mapping[str, str]

    @property
    def repmgr_binary(self) -> str:
        base = self.repmgr_bindir or self.pg_bindir
        return f"{base.rstrip('/')}/repmgr" if base else "repmgr"


def _int_setting(values: Mapping[str, str], key: str, default: int, source: str) -> int:
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {key}={raw!r} is not a whole number; fix it") from exc


def load_repmgr_conf(path: Path) -> RepmgrConf:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"repmgr_config: cannot read {path} ({exc.strerror}); "
            "point repmgr_config at the node's repmgr.conf and make it readable"
        ) from exc
    values = parse_repmgr_conf_text(text, str(path))
    for key in ("node_id", "node_name", "conninfo"):
        if not values.get(key):
            raise ConfigError(f"{path}: {key} is missing; repmgr needs it too, set it")
    try:
        parse_conninfo(values["conninfo"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return RepmgrConf(
        path=path,
        node_id=_int_setting(values, "node_id", 0, str(path)),
        node_name=values["node_name"],
        conninfo=values["conninfo"],
        data_directory=values.get("data_directory", ""),
        pg_bindir=values.get("pg_bindir", ""),
        repmgr_bindir=values.get("repmgr_bindir", ""),
        ssh_options=values.get("ssh_options", ""),
        reconnect_attempts=_int_setting(values, "reconnect_attempts", 6, str(path)),
        reconnect_interval=_int_setting(values, "reconnect_interval", 10, str(path)),
        raw=values,
    )
