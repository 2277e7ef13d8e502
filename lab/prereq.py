"""What a machine needs for the lab: each program with the Debian package it comes from."""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

from lab.procs import _base_env, run_cmd
from lab.settings import (
    ARPING,
    IP_BIN,
    IPCRM,
    IPCS,
    MOUNT,
    PG_BIN,
    PG_USER,
    PING,
    RUNUSER,
    SETPRIV,
    SSH,
    SSH_KEYGEN,
    SSHD,
    SUDO,
    SYSCTL,
    UMOUNT,
    USERMOD,
    VISUDO,
    LabError,
)

PREREQUISITES: tuple[tuple[str, str], ...] = (
    *((f"{PG_BIN}/{b}", "postgresql-15") for b in ("initdb", "pg_ctl", "postgres")),
    *((f"{PG_BIN}/{b}", "postgresql-client-15") for b in ("psql", "pg_isready")),
    *((f"{PG_BIN}/{b}", "postgresql-15-repmgr") for b in ("repmgr", "repmgrd")),
    (IP_BIN, "iproute2"),
    (RUNUSER, "util-linux"),
    (SETPRIV, "util-linux"),
    (IPCS, "util-linux"),
    (IPCRM, "util-linux"),
    (SYSCTL, "procps"),  # IPv6 neighbour discovery settings per host
    (MOUNT, "mount"),
    (UMOUNT, "mount"),
    (SSHD, "openssh-server"),
    (SSH, "openssh-client"),
    (SSH_KEYGEN, "openssh-client"),
    (ARPING, "iputils-arping"),
    (PING, "iputils-ping"),
    (SUDO, "sudo"),
    (VISUDO, "sudo"),
    (USERMOD, "passwd"),
    ("/usr/bin/fuser", "psmisc"),  # named by repmgr-vip's lock-busy message
    ("/usr/bin/python3", "python3"),
    ("/usr/bin/git", "git"),  # bench: which commit the figures belong to
    ("/usr/bin/strace", "strace"),  # test_quiet, bench: the processes a daemon starts
)


REPMGR_EXTENSION = ("/usr/share/postgresql/15/extension/repmgr.control", "postgresql-15-repmgr")


def missing_prerequisites() -> list[str]:
    """Why the lab cannot run here (empty list: it can), each with the package to install."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    missing += [
        f"missing {path}: apt-get install {package}"
        for path, package in PREREQUISITES
        if not os.access(path, os.X_OK)
    ]
    path, package = REPMGR_EXTENSION
    if not Path(path).exists():
        missing.append(f"missing {path}: apt-get install {package}")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        missing.append("no postgres user: apt-get install postgresql-15")
    return missing


def ensure_postgres_account() -> None:
    """Unlock Debian's postgres account ('!' -> '*'): sshd without PAM refuses '!'.

    '*' still allows no password login; it only stops sshd calling the account locked.
    """
    for attempt in range(5):
        try:
            lines = Path("/etc/shadow").read_text().splitlines()
        except OSError as exc:
            raise LabError(f"cannot read /etc/shadow: {exc}") from exc
        field = next((ln.split(":")[1] for ln in lines if ln.startswith(f"{PG_USER}:")), "")
        if not field.startswith("!"):
            return
        res = run_cmd([USERMOD, "-p", "*", PG_USER], check=False, env=_base_env("root", None))
        if res.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))  # another run may hold the shadow lock
    raise LabError("could not unlock the postgres account with usermod -p '*'")
