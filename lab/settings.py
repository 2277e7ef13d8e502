"""Fixed names of the lab: addresses, paths of the programs it runs, and its errors."""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("lab")
VIP = "192.0.2.115/24"
VIP_IP = "192.0.2.115"
INTERFACE = "eth0"
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_PORT = 5432
SUBNET = "192.0.2.0/24"
CLIENT_IP = "192.0.2.100"
WITNESS_IP = "192.0.2.30"
WITNESS_NODE_ID = 99
# IPv6 inside the lab's namespaces only (documentation prefix, no routes): each host has
# 2001:db8::N beside 192.0.2.N; the kernel's DAD and ndisc_notify as sudo mode needs them.
SUBNET6 = "2001:db8::/64"
VIP6 = "2001:db8::115/64"
VIP6_IP = "2001:db8::115"
PG_USER = "postgres"
REPMGR_USER = "repmgr"
REPMGR_DB = "repmgr"
IP_BIN = "/usr/bin/ip" if Path("/usr/bin/ip").exists() else "/sbin/ip"
RUNUSER = "/usr/sbin/runuser"
SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
ARPING = "/usr/bin/arping"
VISUDO = "/usr/sbin/visudo"
USERMOD = "/usr/sbin/usermod"
PING = "/usr/bin/ping"
SETPRIV = "/usr/bin/setpriv"
SUDO = "/usr/bin/sudo"
MOUNT = "/usr/bin/mount"
UMOUNT = "/usr/bin/umount"
IPCS = "/usr/bin/ipcs"
IPCRM = "/usr/bin/ipcrm"
SYSCTL = "/usr/sbin/sysctl"
SUDOERS_DIR = Path("/etc/sudoers.d")
SUDOERS_PREFIX = "repmgr-vip-lab-"
WORKDIR_ROOT = Path("/tmp")
WORKDIR_PREFIX = "rvlab-"
# No /usr/local: that tree holds odd copies of repmgr on this workplace.
DEFAULT_PATH = f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")


def ipv6_of(ipv4: str) -> str:
    """A lab host's IPv6 address: 192.0.2.N -> 2001:db8::N."""
    return f"2001:db8::{ipv4.rsplit('.', 1)[1]}"


T = TypeVar("T")


class LabError(RuntimeError):
    """Raised when the lab cannot be built or is in an unexpected state."""


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message carries its output (CalledProcessError hides it)."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                tail = str(data)[-2000:].rstrip()
                text += f"\n--- {label} ---\n{tail}"
        return text


@dataclass(frozen=True)
class Node:
    """One host of the lab: a namespace, an address and (usually) a PostgreSQL."""

    name: str
    node_id: int
    netns: str
    ip: str
    mac: str
    dir: Path
    repmgr_conf: Path
    socket_dir: Path
    datadir: Path
    is_witness: bool = False

    @property
    def veth(self) -> str:
        """Name of this node's veth end inside the bridge namespace."""
        return "vw" if self.is_witness else f"v{self.node_id}"

    @property
    def pg_log(self) -> Path:
        """The postmaster's log file (pg_ctl -l)."""
        return self.dir / "postgresql.log"

    @property
    def repmgr_log(self) -> Path:
        """repmgr's and repmgrd's log_file."""
        return self.dir / "repmgr.log"

    @property
    def repmgrd_pid_file(self) -> Path:
        """repmgrd_pid_file from repmgr.conf."""
        return self.socket_dir / "repmgrd.pid"

    @property
    def conninfo(self) -> str:
        """The conninfo repmgr stores for this node."""
        return (
            f"host={self.ip} port={PG_PORT} user={REPMGR_USER} dbname={REPMGR_DB} connect_timeout=2"
        )
