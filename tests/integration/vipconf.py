"""Writes repmgr-vip configs for lab nodes and runs the installed CLI in a node, as postgres."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lab import INTERFACE, VIP, Lab, Node

# What the lab runs: RV_UNDER_TEST (`make test` sets /usr/bin/repmgr-vip, the installed Debian
# package), else the venv's console script (pytest runs from the same venv the hooks use).
REPMGR_VIP = os.environ.get("RV_UNDER_TEST") or str(Path(sys.executable).parent / "repmgr-vip")


def _interpreter(script: str) -> str:
    """The Python that runs the command under test (its #! line), so that helper snippets run
    inside a node import the same repmgr_vip: the package's /usr/bin/python3 or the venv's."""
    try:
        with open(script, encoding="utf-8") as handle:
            first = handle.readline()
    except OSError:
        return sys.executable
    return first[2:].split()[0] if first.startswith("#!") and first[2:].split() else sys.executable


PYTHON = _interpreter(REPMGR_VIP)
CONFIG_NAME = "repmgr-vip.toml"


def config_path(node: Node) -> Path:
    return node.dir / CONFIG_NAME


def write_vip_config(lab: Lab, node: Node, extra: str = "", *, address: str = VIP) -> Path:
    """A node's config as a DBA would write it; other nodes' configs follow a path template."""
    path = config_path(node)
    toml_address = address if address.startswith("[") else f'"{address}"'  # a list: as is
    template = str(lab.workdir / "{node_name}" / CONFIG_NAME)
    path.write_text(
        f'repmgr_config = "{node.repmgr_conf}"\n\n'
        f'[vip]\naddress = {toml_address}\ninterface = "{INTERFACE}"\n\n'
        f'[remote]\ncommand = "{REPMGR_VIP}"\nconfig = "{template}"\n\n'
        f"{extra}\n"
    )
    path.chmod(0o644)
    return path


def write_all_configs(lab: Lab, extra: str = "") -> None:
    for node in lab.nodes:
        write_vip_config(lab, node, extra)


def vip(lab: Lab, node: Node, *args: str, user: str = "postgres", timeout: float = 120,
        config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `repmgr-vip -c CONFIG ARGS` inside the node's namespace; never raises on failure."""
    cfg = config or config_path(node)
    return lab.run(node, [REPMGR_VIP, "-c", str(cfg), *args], user=user, check=False,
                   timeout=timeout)


def install_generated_sudoers(lab: Lab, node: Node) -> str:
    """Installs exactly what `repmgr-vip sudoers` prints, and nothing else."""
    result = vip(lab, node, "sudoers")
    assert result.returncode == 0, result.stderr
    lab.install_sudoers(result.stdout)
    return result.stdout


HOOK_KEYS = ("promote_command", "follow_command", "repmgrd_service_start_command",
             "repmgrd_service_stop_command", "event_notification_command", "event_notifications")


def wire_hooks(lab: Lab, node: Node) -> str:
    """Replaces the node's hook lines in repmgr.conf with what `repmgr-vip repmgr-conf` prints."""
    result = vip(lab, node, "repmgr-conf")
    assert result.returncode == 0, result.stderr
    kept = [line for line in node.repmgr_conf.read_text().splitlines()
            if line.split("=", 1)[0].strip() not in HOOK_KEYS]
    node.repmgr_conf.write_text("\n".join(kept) + "\n" + result.stdout)
    return result.stdout


def hooked_cluster(lab: Lab, extra_toml: str = "", *, start: bool = True) -> None:
    """Configs, generated sudoers and hook lines on every node; repmgrd started the repmgr way."""
    write_all_configs(lab, extra_toml)
    install_generated_sudoers(lab, lab.nodes[0])
    for node in lab.nodes:
        wire_hooks(lab, node)
    if start:
        for node in lab.nodes:
            result = lab.repmgr(node, "daemon", "start", check=False, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr


def vip_log(node: Node) -> str:
    path = node.dir / "repmgr-vip.log"
    return path.read_text() if path.exists() else ""


SETPRIV_AMBIENT = ["/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                   "--inh-caps=+net_admin,+net_raw", "--ambient-caps=+net_admin,+net_raw"]


def start_daemon(lab: Lab, node: Node, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    """The daemon as the systemd unit runs it: user postgres with ambient CAP_NET_ADMIN/RAW."""
    return lab.popen(node, [*SETPRIV_AMBIENT, REPMGR_VIP, "-c", str(config_path(node)),
                            "daemon"], user="root", env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_daemon(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    proc.terminate()
    return proc.wait(timeout=timeout)


# --- what the lab tests look at, in one place --------------------------------------------


def has_vip(lab: Lab, node: Node) -> bool:
    return VIP in lab.addresses(node)


def wait_until(lab: Lab, what: str, predicate: Callable[[], bool], timeout: float = 60.0,
               interval: float = 0.05) -> float:
    """Polls predicate until true (TimeoutError naming `what`); the seconds it took."""
    started = time.monotonic()
    lab.wait_for(predicate, timeout, interval=interval, what=what)
    return time.monotonic() - started


def never_during(predicate: Callable[[], bool], seconds: float) -> None:
    """AssertionError the first time predicate holds within `seconds` (checked every 50 ms)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert not predicate()
        time.sleep(0.05)


def metrics(lab: Lab, node: Node) -> str:
    """The node's Prometheus endpoint as seen from inside its namespace ("" if it is not up).

    Debian's python3 with the standard library only: the command under test may be the
    package's, with no venv around it."""
    get = ("import urllib.request;print(urllib.request.urlopen("
           "'http://127.0.0.1:9853/metrics', timeout=5).read().decode())")
    fetch = lab.run(node, ["/usr/bin/python3", "-c", get], check=False)
    return fetch.stdout if fetch.returncode == 0 else ""


def journal_entries(node: Node, **match: object) -> list[Mapping[str, Any]]:
    """The node's decision journal entries whose fields equal `match` (what tests assert on,
    rather than log wording)."""
    from repmgr_vip.adapters import journal

    return [e for e in journal.read(node.dir) if all(e.get(k) == v for k, v in match.items())]


def wait_failover_done(lab: Lab, new: Node, timeout: float = 60.0) -> None:
    """`new` promoted, the VIP on it alone, and its promote hook through its last step
    (the CHECKPOINT after the VIP is up): the failover is over from every angle."""
    wait_until(lab, f"{new.name} promoted", lambda: lab.is_in_recovery(new) is False, timeout)
    wait_until(lab, f"VIP on {new.name} alone", lambda: lab.vip_holders() == [new.name], 20)
    wait_until(lab, "the promote hook's last step (CHECKPOINT)", lambda: bool(
        journal_entries(new, source="promote", action="checkpoint")), 30)
