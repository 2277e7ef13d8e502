"""How this process gets the right to change addresses: through sudo, or directly.

Hooks run by repmgr as the postgres user use `sudo -n` with exact command lines (see
`repmgr-vip sudoers`); a daemon started with CAP_NET_ADMIN and CAP_NET_RAW (root or a systemd
unit with ambient capabilities) runs the same programs directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_network_capabilities() -> bool:
    caps = _effective_capabilities()
    return bool(caps & (1 << CAP_NET_ADMIN)) and bool(caps & (1 << CAP_NET_RAW))


def effective_mode(configured: str) -> str:
    """'auto' becomes 'direct' when the process may already change addresses, else 'sudo'."""
    if configured != "auto":
        return configured
    return "direct" if os.geteuid() == 0 or has_network_capabilities() else "sudo"


def privileged(argv: Sequence[str], mode: str, sudo: str) -> list[str]:
    """The command line actually executed for a privileged action."""
    return [sudo, "-n", *argv] if mode == "sudo" else list(argv)


_SUDOERS_SPECIAL = str.maketrans({"\\": "\\\\", ",": "\\,", ":": "\\:", "=": "\\=", "#": "\\#"})


def sudoers_rules(
    commands: Sequence[Sequence[str]], *, user: str, alias: str, comment: str
) -> str:
    """Rules that allow exactly these command lines as root, without a password, and no more."""
    entries = [" ".join(part.translate(_SUDOERS_SPECIAL) for part in cmd) for cmd in commands]
    body = ", \\\n    ".join(entries)
    return (
        f"{comment}\n"
        f"Cmnd_Alias {alias} = {body}\n"
        f"Defaults!{alias} !requiretty\n"
        f"{user} ALL=(root) NOPASSWD: {alias}\n"
    )
