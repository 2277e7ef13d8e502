"""The repmgr-vip TOML configuration: schema, defaults and validation before any action.

Everything is checked up front so that a typo never reaches the network: unknown keys,
wrong types, a VIP that is not an address, a missing interface, an unreadable repmgr.conf
each raise ConfigError (exit 2) with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repmgr_vip.config import statepaths
from repmgr_vip.config.repmgrconf import RepmgrConf, load_repmgr_conf
from repmgr_vip.core.conninfo import parse_conninfo
from repmgr_vip.core.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/repmgr-vip.toml")
CONFIG_ENV = "REPMGR_VIP_CONFIG"
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}\Z")
PRIVILEGE_MODES = ("auto", "sudo", "direct")
UNFREE_POLICIES = ("refuse", "promote-without-vip")
STOP_POLICIES = ("keep", "release")



def parse_vip6(text: str, key: str) -> ipaddress.IPv6Interface:
    """ADDRESS/PREFIX for an IPv6 VIP: a unicast address that neighbours can reach."""
    prefix = text.split("/", 1)[1]
    if not (prefix.isascii() and prefix.isdigit()) or not 1 <= int(prefix) <= 128:
        raise ConfigError(f"{key}={text!r}: prefix length must be 1..128; fix {key}")
    try:
        vip = ipaddress.IPv6Interface(text)
    except ValueError as exc:
        raise ConfigError(f"{key}={text!r} is not ADDRESS/PREFIX; fix {key}") from exc
    ip = vip.ip
    anycast = ip == vip.network.network_address and vip.network.prefixlen < 127
    if (ip.is_link_local or ip.is_multicast or ip.is_loopback or ip.is_unspecified
            or ip.ipv4_mapped is not None or anycast):
        raise ConfigError(f"{key}={text!r} cannot be a service address; use a global or "
                          "unique-local unicast address (not link-local, multicast, loopback, "
                          "::, IPv4-mapped or the subnet-router anycast address)")
    return vip

def valid_interface_name(name: str) -> bool:
    return _IFNAME.match(name) is not None


def _first_existing(*candidates: str) -> str:
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return candidates[0]


def _own_command() -> str:
    """The absolute path of the running repmgr-vip, so remote and hook lines call the same one."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "repmgr-vip"
    if os.path.basename(argv0) == "repmgr-vip":
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found:
            return os.path.abspath(found)
    sibling = Path(sys.executable).parent / "repmgr-vip"
    return str(sibling) if sibling.exists() else "repmgr-vip"


# section -> key -> (type, default). A default of None means "required".
# Defaults that depend on the host are filled in by _host_defaults().
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "": {"repmgr_config": (str, None), "state_dir": (str, ""), "log_file": (str, ""),
         "log_format": (str, "text")},
    "vip": {
        "address": (str, None),
        "interface": (str, None),
        "announce_count": (int, 3),
        "announce_interval": (float, 0.2),
        "probe_count": (int, 2),
        "probe_timeout": (float, 0.3),
        "lease": (float, 0.0),
    },
    "replica_vip": {  # optional: a read-only address on one healthy standby (replica.py)
        "address": (str, ""),
        "interface": (str, ""),
        "max_lag_bytes": (int, 16777216),
        "prefer": (list, []),
        "on_no_standby": (str, "none"),
    },
    "privileges": {"mode": (str, "auto")},
    "commands": {"ip": (str, ""), "arping": (str, ""), "sudo": (str, ""), "ssh": (str, "")},
    "fencing": {
        "fence_command": (str, ""),
        "fence_timeout": (int, 30),
        "ssh_connect_timeout": (int, 3),
        "ssh_command_timeout": (int, 10),
        "when_vip_not_free": (str, "refuse"),
        "release_retry_for": (int, 86400),
        "checkpoint_after_promote": (bool, True),
        "ssh_kex_first": (str, "curve25519-sha256"),
    },
    "remote": {"command": (str, ""), "config": (str, "")},
    "daemon": {
        "interval": (float, 1.0),
        "isolation_grace": (float, 0.0),
        "conflict_probe_interval": (float, 2.0),
        "on_stop": (str, "keep"),
        "reannounce_interval": (float, 0.0),
        "metrics_address": (str, "127.0.0.1"),
        "metrics_port": (int, 9853),
        "lan_proof": (bool, True),
        "keep_while_down": (float, -1.0),
    },
}


def _host_defaults(config_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "commands": {
            "ip": _first_existing("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"),
            "arping": _first_existing("/usr/bin/arping", "/usr/sbin/arping", "/sbin/arping"),
            "sudo": _first_existing("/usr/bin/sudo", "/bin/sudo"),
            "ssh": _first_existing("/usr/bin/ssh", "/bin/ssh"),
        },
        "remote": {"command": _own_command(), "config": str(config_path)},
    }


VipInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class VipSettings:
    address: VipInterface  # the first address; `addresses` holds all of them (dual stack)
    interface: str
    announce_count: int
    announce_interval: float
    probe_count: int
    probe_timeout: float
    lease: float = 0.0  # seconds; 0: a permanent address (see lease.py)
    addresses: tuple[VipInterface, ...] = ()

    @property
    def all(self) -> tuple[VipInterface, ...]:
        """Every address of the VIP; they are added, removed and announced together."""
        return self.addresses or (self.address,)

    @property
    def cidrs(self) -> tuple[str, ...]:
        """Every address as "ip/len" (InterfaceState.holds_all, held_map)."""
        return tuple(a.with_prefixlen for a in self.all)

    @property
    def ip(self) -> str:
        return str(self.address.ip)

    @property
    def cidr(self) -> str:
        """The VIP as people read it: "ip/len", or every address joined (dual stack)."""
        return ", ".join(a.with_prefixlen for a in self.all)


@dataclass(frozen=True)
class ReplicaSettings:
    """[replica_vip]: its addresses (announce/probe settings from [vip]) and placement."""

    vip: VipSettings
    max_lag_bytes: int
    prefer: tuple[str, ...]
    on_no_standby: str


@dataclass(frozen=True)
class Commands:
    ip: str
    arping: str
    sudo: str
    ssh: str


@dataclass(frozen=True)
class FencingSettings:
    fence_command: str
    fence_timeout: int
    ssh_connect_timeout: int
    ssh_command_timeout: int
    when_vip_not_free: str
    release_retry_for: int  # seconds to keep asking unconfirmed nodes to release; 0: never
    checkpoint_after_promote: bool  # so pg_rewind sees the new timeline at once
    # offered first (ssh -o KexAlgorithms=^...): the default hybrid post-quantum key exchange
    # costs a fresh connection ~100 ms of CPU, on the failover's critical path; "": ssh's order
    ssh_kex_first: str


@dataclass(frozen=True)
class RemoteSettings:
    command: str
    config: str

    def config_for(self, node_name: str, node_id: int) -> str:
        return self.config.replace("{node_name}", node_name).replace("{node_id}", str(node_id))


@dataclass(frozen=True)
class DaemonSettings:
    interval: float
    isolation_grace: float
    conflict_probe_interval: float
    on_stop: str
    reannounce_interval: float
    metrics_address: str
    metrics_port: int
    lan_proof: bool  # the daemon's 80 ms raw-socket ARP proof instead of vip.probe_*
    keep_while_down: float  # -1: auto (see keep_while_down()); 0: drop at once


@dataclass(frozen=True)
class Config:
    path: Path
    repmgr: RepmgrConf
    vip: VipSettings
    privilege_mode: str
    commands: Commands
    fencing: FencingSettings
    remote: RemoteSettings
    daemon: DaemonSettings
    state_dir: Path
    log_file: Path
    values: Mapping[str, Mapping[str, Any]] = field(repr=False)
    replica: ReplicaSettings | None = None  # [replica_vip], None when not configured

    @property
    def lock_path(self) -> Path:
        return statepaths.lock_file(self.state_dir)


def resolve_config_path(cli_value: str | None) -> Path:
    """The config file, made absolute: it is written into hook lines and remote commands,
    which repmgr and ssh run from another working directory."""
    if cli_value:
        return Path(os.path.abspath(cli_value))
    from_env = os.environ.get(CONFIG_ENV)
    return Path(os.path.abspath(from_env)) if from_env else DEFAULT_CONFIG_PATH


def _key_name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


# Inclusive bounds of every number (a float bound of 0 with "> 0" is checked separately).
RANGES: dict[str, tuple[float, float]] = {
    "vip.announce_count": (1, 1000),
    "vip.announce_interval": (0, 3600),
    "vip.probe_count": (1, 100),
    "vip.probe_timeout": (0, 60),
    "fencing.fence_timeout": (1, 86400),
    "fencing.ssh_connect_timeout": (1, 3600),
    "fencing.ssh_command_timeout": (1, 86400),
    "daemon.interval": (0, 3600),
    "daemon.isolation_grace": (0, 86400),
    "daemon.keep_while_down": (-1, 86400),
    "daemon.conflict_probe_interval": (0, 3600),
    "daemon.reannounce_interval": (0, 86400),
    "daemon.metrics_port": (0, 65535),
}


def has_control_characters(text: str) -> bool:
    """Any C0/C1 control character but tab: none belongs in a path, name or command line."""
    return any((ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) < 0xA0 for ch in text)


def _check_type(section: str, key: str, value: Any, expected: type) -> Any:
    name = _key_name(section, key)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if name == "replica_vip.prefer" and isinstance(value, list):
        if not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"{name} must be a list of node names; fix {name}")
        return [_check_type(section, key, item, str) for item in value]
    if name in ("vip.address", "replica_vip.address") and isinstance(value, list) and value and all(
            isinstance(item, str) for item in value):
        return [_check_type(section, key, item, str) for item in value]  # dual stack
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ConfigError(
            f"{name} must be a {expected.__name__}, "
            f"got {type(value).__name__} {value!r}; fix {name}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} is not a finite number; give a number of seconds")
    if isinstance(value, int | float) and name in RANGES:
        low, high = RANGES[name]
        if not low <= value <= high:
            raise ConfigError(f"{name} = {value!r} is out of range; use {low:g}..{high:g}")
    if isinstance(value, str) and has_control_characters(value):
        raise ConfigError(f"{name} contains a control character ({value!r}); remove it")
    return value


def merge_with_schema(raw: Mapping[str, Any], config_path: Path) -> dict[str, dict[str, Any]]:
    """Rejects unknown keys and wrong types; returns every key with its effective value."""
    host = _host_defaults(config_path)
    merged: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key in SCHEMA and key != "":
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table; write it as a [{key}] section")
            continue
        if key not in SCHEMA[""]:
            known = ", ".join(sorted([*SCHEMA[""], *(f"[{s}]" for s in SCHEMA if s)]))
            raise ConfigError(f"unknown key {key!r}; remove it or use one of: {known}")
    for section, keys in SCHEMA.items():
        given = raw if section == "" else raw.get(section, {})
        if section:
            for key in given:
                if key not in keys:
                    known = ", ".join(sorted(keys))
                    raise ConfigError(
                        f"unknown key {section}.{key}; remove it or use one of: {known}"
                    )
        out: dict[str, Any] = {}
        for key, (expected, default) in keys.items():
            if section == "" and key in SCHEMA and key != "":
                continue
            if key in given:
                out[key] = _check_type(section, key, given[key], expected)
            elif default is None:
                where = f"in [{section}]" if section else "at the top of the file"
                raise ConfigError(f"{_key_name(section, key)} is required; add it {where}")
            else:
                out[key] = default
            if out[key] == "" and key in host.get(section, {}):
                out[key] = host[section][key]
        merged[section] = out
    return merged


def parse_vip(text: str, key: str = "vip.address") -> VipInterface:
    if "/" not in text:
        example = "64" if ":" in text else "24"
        raise ConfigError(
            f"{key}={text!r} has no prefix length; write it as ADDRESS/PREFIX, "
            f"e.g. {text}/{example}"
        )
    address, prefix = text.split("/", 1)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise ConfigError(f"{key}={text!r}: {address!r} is not an IP address; fix {key}") from exc
    if ip.version == 6:
        return parse_vip6(text, key)
    if not (prefix.isascii() and prefix.isdigit()) or not 1 <= int(prefix) <= 32:
        raise ConfigError(f"{key}={text!r}: prefix length must be 1..32; fix {key}")
    try:
        vip = ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise ConfigError(f"{key}={text!r} is not ADDRESS/PREFIX; fix {key}") from exc
    broadcast = vip.network.broadcast_address if vip.network.prefixlen < 31 else None
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip == broadcast:
        raise ConfigError(f"{key}={text!r} cannot be a service address; use a unicast address")
    return vip


def parse_vips(value: str | list[str], key: str = "vip.address") -> tuple[VipInterface, ...]:
    """One address, or a list (dual stack): at most one IPv4 and one IPv6, no duplicates."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ConfigError(f"{key} is an empty list; give one address or one IPv4 and one IPv6")
    parsed = tuple(parse_vip(text, key) for text in texts)
    for version in (4, 6):
        same = [a.with_prefixlen for a in parsed if a.version == version]
        if len(same) > 1:
            problem = ("the same address twice" if len({a.split("/")[0] for a in same}) == 1
                       else f"{len(same)} IPv{version} addresses")
            raise ConfigError(f"{key} = {texts!r} has {problem}; give at most one IPv4 and one "
                              f"IPv6 address (dual stack)")
    return parsed


def _positive(section: str, values: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if values[key] <= 0:
            raise ConfigError(f"{section}.{key} must be greater than 0; fix {section}.{key}")


def _choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}={value!r}; use one of: {', '.join(choices)}")


MAX_LEASE = 86400.0
KEX_LIST = re.compile(r"(?:[A-Za-z0-9@._-]+(?:,[A-Za-z0-9@._-]+)*)?")


def _check_lease(lease: float) -> None:
    """A lease becomes the kernel's valid_lft in whole seconds: finite, 0 (off) up to a day."""
    if not math.isfinite(lease) or not 0 <= lease <= MAX_LEASE:
        raise ConfigError(f"vip.lease={lease!r} must be 0 (permanent address) or a number of "
                          f"seconds up to {MAX_LEASE:g}; fix vip.lease")


def build_config(raw: Mapping[str, Any], path: Path, *, check_host: bool = True) -> Config:
    values = merge_with_schema(raw, path)
    vip_values = values["vip"]
    addresses = parse_vips(vip_values["address"])
    vip = VipSettings(address=addresses[0], addresses=addresses, **{
        k: vip_values[k] for k in ("interface", "announce_count", "announce_interval",
                                   "probe_count", "probe_timeout", "lease")
    })
    if not _IFNAME.match(vip.interface):
        raise ConfigError(
            f"vip.interface={vip.interface!r} is not a valid interface name; use e.g. 'eth0'"
        )
    _positive("vip", vip_values, "announce_count", "announce_interval", "probe_count",
              "probe_timeout")
    _check_lease(vip.lease)
    if vip.lease and (len(addresses) > 1 or addresses[0].version == 6):
        raise ConfigError("vip.lease works with one IPv4 address only; set vip.lease = 0 for "
                          "an IPv6 or dual-stack vip.address")
    _choice("privileges", "mode", values["privileges"]["mode"], PRIVILEGE_MODES)
    if values[""]["log_format"] not in ("text", "json"):
        raise ConfigError(f"log_format={values['']['log_format']!r}; use one of: text, json")
    _choice(
        "fencing", "when_vip_not_free", values["fencing"]["when_vip_not_free"], UNFREE_POLICIES
    )
    _positive("fencing", values["fencing"], "fence_timeout", "ssh_connect_timeout",
              "ssh_command_timeout")
    _positive("daemon", values["daemon"], "interval", "conflict_probe_interval")
    if not KEX_LIST.fullmatch(values["fencing"]["ssh_kex_first"]):
        raise ConfigError(f"fencing.ssh_kex_first={values['fencing']['ssh_kex_first']!r} is not a "
                          "comma-separated list of key exchange names (ssh -Q kex); fix it, or "
                          "set \"\" for ssh's own order")
    if values["fencing"]["release_retry_for"] < 0:
        raise ConfigError("fencing.release_retry_for must be 0 (off) or more seconds; fix it")
    if values["daemon"]["isolation_grace"] < 0:
        raise ConfigError("daemon.isolation_grace must be 0 (auto) or more; fix it")
    if values["daemon"]["keep_while_down"] < 0 and values["daemon"]["keep_while_down"] != -1:
        raise ConfigError("daemon.keep_while_down must be -1 (auto), 0 (off) or more seconds; "
                          "fix it")
    _choice("daemon", "on_stop", values["daemon"]["on_stop"], STOP_POLICIES)
    for name, binary in values["commands"].items():
        if not os.path.isabs(binary):
            raise ConfigError(f"commands.{name}={binary!r} must be an absolute path; fix it")
    repmgr = load_repmgr_conf(Path(values[""]["repmgr_config"]))
    host = parse_conninfo(repmgr.conninfo).get("host", "")
    for address in vip.all:
        if host and _same_ip(host, str(address.ip)):
            raise ConfigError(
                f"vip.address={address.with_prefixlen} is this node's own address "
                f"({repmgr.path} conninfo host); choose a free address for the VIP"
            )
    if check_host and not Path("/sys/class/net", vip.interface).exists():
        raise ConfigError(
            f"vip.interface={vip.interface!r} does not exist on this host; "
            "set it to the NIC that carries the node's address (see `ip -br link`)"
        )
    state_dir = values[""]["state_dir"] or _default_state_dir(repmgr)
    replica = _replica_settings(values["replica_vip"], vip)
    return Config(
        path=path,
        repmgr=repmgr,
        vip=vip,
        privilege_mode=values["privileges"]["mode"],
        commands=Commands(**values["commands"]),
        fencing=FencingSettings(**values["fencing"]),
        remote=RemoteSettings(**values["remote"]),
        daemon=DaemonSettings(**values["daemon"]),
        state_dir=Path(state_dir),
        log_file=Path(values[""]["log_file"] or statepaths.default_log_file(Path(state_dir))),
        values=values,
        replica=replica,
    )


def _replica_settings(values: Mapping[str, Any], vip: VipSettings) -> ReplicaSettings | None:
    if values["address"] in ("", []):
        return None
    addresses = parse_vips(values["address"], "replica_vip.address")
    taken = {a.ip for a in vip.all}
    for address in addresses:
        if address.ip in taken:
            raise ConfigError(f"replica_vip.address={address.with_prefixlen} is also in "
                              "vip.address; give the replica VIP an address of its own")
    interface = values["interface"] or vip.interface
    if not _IFNAME.match(interface):
        raise ConfigError(f"replica_vip.interface={interface!r} is not a valid interface "
                          "name; use e.g. 'eth0'")
    if values["max_lag_bytes"] < 0:
        raise ConfigError("replica_vip.max_lag_bytes must be 0 or more bytes; fix it")
    _choice("replica_vip", "on_no_standby", values["on_no_standby"], ("none", "primary"))
    settings = dataclasses.replace(vip, address=addresses[0], addresses=addresses,
                                   interface=interface, lease=0.0)
    return ReplicaSettings(settings, values["max_lag_bytes"], tuple(values["prefer"]),
                           values["on_no_standby"])


def _same_ip(host: str, vip_ip: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(vip_ip)
    except ValueError:
        return False  # a host name: resolving it could hang on DNS, so it is not compared


def _default_state_dir(repmgr: RepmgrConf) -> str:
    """The data directory's parent: owned by postgres and private to this node."""
    if repmgr.data_directory:
        return str(Path(repmgr.data_directory).parent)
    return str(repmgr.path.parent)


def load_config(path: Path, *, check_host: bool = True) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config {path} ({exc.strerror}); pass -c FILE or set {CONFIG_ENV}"
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from exc
    return build_config(raw, path, check_host=check_host)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string that tomllib reads back as exactly `text` (controls escaped)."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_string(str(value))


def render_toml(values: Mapping[str, Mapping[str, Any]]) -> str:
    """Writes a config back as TOML; used by `config` and `init`."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.get("", {}).items()]
    for section, keys in values.items():
        if section == "" or not keys:
            continue
        lines.append("")
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
    return "\n".join(lines) + "\n"


KEEP_WHILE_DOWN_MARGIN = 10.0  # seconds past repmgrd's detection for its promote_command


def keep_while_down(config: Config) -> float:
    """How long a primary whose PostgreSQL died keeps the VIP (daemon.keep_while_down).

    Auto: repmgrd's own detection time (reconnect_attempts x reconnect_interval) plus a
    margin, so the VIP stays until the promoted standby asks for it; a promoting node that
    cannot reach the old one waits at most this long for it to let go (fencing).
    """
    configured = config.daemon.keep_while_down
    if configured >= 0:
        return configured
    detection = config.repmgr.reconnect_attempts * config.repmgr.reconnect_interval
    return detection + KEEP_WHILE_DOWN_MARGIN
