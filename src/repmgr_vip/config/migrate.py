"""Turns the seed's shell env file (.repmgr_env) into a repmgr-vip TOML config.

The env file is read as data (`export KEY=value` lines), never sourced by a shell.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from repmgr_vip.config.schema import has_control_characters, parse_vip, valid_interface_name
from repmgr_vip.core.errors import ConfigError

_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
KNOWN_KEYS = ("VIP", "INTERFACE", "REPMGR_DIR", "PGBINDIR")


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); pass the seed's env file") from exc
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ASSIGN.match(line)
        if match is None:
            raise ConfigError(f"{path}:{lineno}: expected KEY=value, got {line.strip()!r}")
        key, raw = match.groups()
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: {exc}; fix the quoting of {key}") from exc
        if len(words) > 1:
            raise ConfigError(
                f"{path}:{lineno}: {key} has {len(words)} words ({' '.join(words)!r}) but takes "
                f"one; keep a single value for {key}"
            )
        value = words[0] if words else ""
        if has_control_characters(value):
            raise ConfigError(f"{path}:{lineno}: {key} contains a control character "
                              f"({value!r}); remove it")
        values[key] = value
    return values


def config_from_env(env: dict[str, str], prefix_length: int | None) -> dict[str, Any]:
    """Values for render_toml(): the env file's VIP, INTERFACE and REPMGR_DIR, PGBINDIR."""
    for key in ("VIP", "INTERFACE", "REPMGR_DIR"):
        if not env.get(key):
            raise ConfigError(f"env file has no {key}; add `export {key}=...` or write the TOML")
    vip = env["VIP"]
    if "/" not in vip:
        if prefix_length is None:
            raise ConfigError(
                f"VIP={vip} has no prefix length (the seed's scripts hard-code /16); "
                "pass --prefix-length N"
            )
        vip = f"{vip}/{prefix_length}"
    parse_vip(vip, "VIP")
    if not valid_interface_name(env["INTERFACE"]):
        raise ConfigError(
            f"INTERFACE={env['INTERFACE']!r} is not a valid interface name; use e.g. eth0"
        )
    repmgr_config = str(Path(env["REPMGR_DIR"]) / "repmgr.conf")
    values: dict[str, Any] = {
        "": {"repmgr_config": repmgr_config},
        "vip": {"address": vip, "interface": env["INTERFACE"]},
    }
    unknown = sorted(set(env) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(
            f"env file sets {', '.join(unknown)}, which repmgr-vip does not use; "
            "remove them (PGBINDIR is taken from repmgr.conf's pg_bindir)"
        )
    return values
