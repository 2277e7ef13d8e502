"""Writes repmgr-vip configs for lab nodes and runs the installed CLI in a node, as postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.lab.lab import INTERFACE, VIP, Lab, Node

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
