"""Every file repmgr-vip keeps in state_dir, by name: the one list (the I/O is statefiles').

Names only, no I/O, so that the configuration, the hooks, the daemon and the tests agree on
them without importing the code that writes them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # pathlib costs the promote hook's quick start milliseconds
if TYPE_CHECKING:
    from pathlib import Path

LOCK = "repmgr-vip.lock"
DAEMON_STATE = "repmgr-vip-daemon.json"
SELF_FENCE = "repmgr-vip-self-fenced"
NODES_CACHE = "repmgr-vip-nodes.json"
ANNOUNCER_PID = "repmgr-vip-announce.pid"
LOG = "repmgr-vip.log"
JOURNAL = "repmgr-vip-journal.jsonl"
RELEASE_REQUEST = "repmgr-vip-release-requested"
CONTROL_SOCKET = "repmgr-vip-control.sock"  # the daemon's; hooks hand it their VIP steps
EARLY_RELEASE = "repmgr-vip-early-release.json"  # what the quick start may ssh at once
SSH_CONTROL = "repmgr-vip-ssh"  # + "-UID": one private directory per user, for ssh's sockets


def lock_file(state_dir: Path) -> Path:
    return state_dir / LOCK


def daemon_state_file(state_dir: Path) -> Path:
    return state_dir / DAEMON_STATE


def self_fence_marker(state_dir: Path) -> Path:
    return state_dir / SELF_FENCE


def nodes_cache(state_dir: Path) -> Path:
    return state_dir / NODES_CACHE


def announcer_pid_file(state_dir: Path) -> Path:
    return state_dir / ANNOUNCER_PID


def release_request_marker(state_dir: Path) -> Path:
    return state_dir / RELEASE_REQUEST


def journal_file(state_dir: Path) -> Path:
    return state_dir / JOURNAL


def control_socket(state_dir: Path) -> Path:
    return state_dir / CONTROL_SOCKET


def early_release_plan(state_dir: Path) -> Path:
    return state_dir / EARLY_RELEASE


def ssh_control_dir(state_dir: Path, uid: int) -> Path:
    """ssh's ControlPath sockets of user `uid`: a 0700 directory only that user can enter."""
    return state_dir / f"{SSH_CONTROL}-{uid}"


def default_log_file(state_dir: Path) -> Path:
    return state_dir / LOG
