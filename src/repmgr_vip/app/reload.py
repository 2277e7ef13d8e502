"""SIGHUP: the daemon re-reads its configuration without a restart (`systemctl reload`).

A restart would do too (the VIP stays by default), but a reload keeps the peer watchers, the
decision memory (failure counts, isolation timers) and the metrics endpoint. The new file is
validated exactly as at start-up; anything wrong, or a change that only a restart can apply
safely, is refused with one log line and the running configuration stays in force.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from repmgr_vip.adapters.log import LOG, setup_logging_for
from repmgr_vip.config.schema import Config, load_config
from repmgr_vip.core.errors import VipError

if TYPE_CHECKING:
    from repmgr_vip.app.daemon import Daemon

# Changing these under a running daemon would strand state: the VIP on the old address or
# interface, the lock or state file of another directory, a metrics port already bound, the
# identity of this node.
RESTART_ONLY = (("vip", "address"), ("vip", "interface"), ("", "repmgr_config"),
                ("", "state_dir"), ("daemon", "metrics_address"), ("daemon", "metrics_port"),
                ("daemon", "lan_proof"),
                # the replica VIP's thread keeps the settings it started with
                *(("replica_vip", key) for key in ("address", "interface", "max_lag_bytes",
                                                   "prefer", "on_no_standby")))


def _flat(values: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
    return {(section, key): value for section, keys in values.items()
            for key, value in keys.items()}


def _name(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def changes(old: Config, new: Config) -> Iterator[str]:
    """`key old -> new` for every effective value that differs, repmgr.conf's node included."""
    before, after = _flat(old.values), _flat(new.values)
    for where in sorted(before.keys() | after.keys()):
        if before.get(where) != after.get(where):
            yield f"{_name(*where)} {before.get(where)!r} -> {after.get(where)!r}"
    if (old.repmgr.node_id, old.repmgr.node_name) != (new.repmgr.node_id, new.repmgr.node_name):
        yield (f"repmgr node {old.repmgr.node_id} ({old.repmgr.node_name}) -> "
               f"{new.repmgr.node_id} ({new.repmgr.node_name})")


def reload_config(current: Config) -> Config:
    """The re-read configuration, or `current` when the new one is invalid (logged, one line)."""
    try:
        new = load_config(current.path)
    except VipError as exc:
        LOG.error("reload refused, running configuration kept: %s", exc,
                  extra={"event": "reload", "outcome": "refused"})
        return current
    before, after = _flat(current.values), _flat(new.values)
    moved = [_name(*key) for key in RESTART_ONLY if before.get(key) != after.get(key)]
    if current.repmgr.node_id != new.repmgr.node_id:
        moved.append("node_id (repmgr.conf)")
    if moved:
        LOG.error("reload refused, running configuration kept: %s cannot change while the "
                  "daemon runs; restart it (systemctl restart repmgr-vip)", ", ".join(moved),
                  extra={"event": "reload", "outcome": "refused", "keys": moved})
        return current
    return new


def install_sighup() -> threading.Event:
    """An event set by SIGHUP; the loop checks it at the top of each cycle."""
    requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: requested.set())
    return requested


def reload_daemon(daemon: Daemon) -> bool:
    """Re-reads the file and puts the result into the running daemon; False if nothing changed."""
    from repmgr_vip.adapters.network import VipNetwork
    from repmgr_vip.app.daemon import effective_isolation_grace
    from repmgr_vip.config.schema import keep_while_down

    old = daemon.config
    new = reload_config(old)
    if new is old:
        return False
    diff = list(changes(old, new))
    if not diff:
        LOG.info("reload: %s unchanged", new.path)
        return False
    setup_logging_for(new)
    daemon.config = new
    if isinstance(daemon.network, VipNetwork):  # an injected port (a fake) has no commands
        daemon.network.reconfigure(new)
    daemon.policy = dataclasses.replace(daemon.policy,
                                        isolation_grace=effective_isolation_grace(new),
                                        keep_while_down=keep_while_down(new))
    for watcher in daemon.watchers.values():
        watcher.interval = new.daemon.interval
    LOG.info("configuration reloaded from %s: %s", new.path, "; ".join(diff),
             extra={"event": "reload", "outcome": "applied", "changes": diff})
    return True
