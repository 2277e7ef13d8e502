"""Adapter over the repmgr and repmgrd programs (the same binaries repmgr.conf points at)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from repmgr_vip.adapters import process
from repmgr_vip.adapters.log import LOG
from repmgr_vip.config.schema import Config
from repmgr_vip.core.errors import CommandFailed

# Set for every repmgr command our hooks start: repmgr runs event_notification_command
# synchronously inside it, and the event handler must not wait for the lock our hook holds.
INSIDE_HOOK_ENV = "REPMGR_VIP_INSIDE_HOOK"


def _bindir(config: Config) -> str:
    return (config.repmgr.repmgr_bindir or config.repmgr.pg_bindir).rstrip("/")


def repmgr_argv(config: Config, *args: str) -> list[str]:
    return [config.repmgr.repmgr_binary, "-f", str(config.repmgr.path), *args]


@dataclass
class RepmgrRun:
    """A repmgr command running in the background; output goes to a file, not a pipe."""

    args: tuple[str, ...]
    started: process.Started

    def poll(self) -> int | None:
        return self.started.process.poll()

    def finish(self) -> int:
        """Waits (no timeout: repmgr bounds its own waits), logs the output, returns the status."""
        code = self.started.wait()
        for line in self.started.output_text().splitlines():
            if line.strip():
                LOG.info("repmgr: %s", line.rstrip())
        self.started.close()
        LOG.info("%s exited %d", " ".join(self.args[:2]), code)
        return code


def _missing_bindir(exc: CommandFailed, argv: list[str]) -> CommandFailed:
    if isinstance(exc, process.ProgramNotFound):
        return CommandFailed(f"{argv[0]} not found; set pg_bindir in repmgr.conf")
    return exc


def start_repmgr(config: Config, *args: str) -> RepmgrRun:
    argv = repmgr_argv(config, *args)
    LOG.info("running %s", " ".join(argv))
    env = dict(os.environ, **{INSIDE_HOOK_ENV: "1"})
    try:
        started = process.start(argv, env=env, new_session=False)
    except CommandFailed as exc:
        raise _missing_bindir(exc, argv) from exc
    return RepmgrRun(tuple(args), started)


def run_repmgr(config: Config, *args: str) -> int:
    """Runs repmgr to completion and logs its output."""
    return start_repmgr(config, *args).finish()


def repmgrd_binary(config: Config) -> str:
    base = _bindir(config)
    return f"{base}/repmgrd" if base else "repmgrd"


def repmgrd_pid_file(config: Config) -> Path | None:
    configured = config.repmgr.raw.get("repmgrd_pid_file", "")
    if configured:
        return Path(configured)
    try:
        out = process.run([repmgrd_binary(config), "-f", str(config.repmgr.path),
                           "--show-pid-file"], timeout=10).stdout.strip()
    except CommandFailed:
        return None
    return Path(out) if out else None


def repmgrd_pid(config: Config) -> int | None:
    """The running repmgrd's pid for this config, checked against /proc, or None."""
    pid_file = repmgrd_pid_file(config)
    if pid_file is None:
        return None
    try:
        pid = int(pid_file.read_text(encoding="ascii").split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"repmgrd" in cmdline else None


def start_repmgrd(config: Config, timeout: float = 15.0) -> int:
    """Starts repmgrd daemonized with no inherited stdio, so `repmgr daemon start` never hangs."""
    running = repmgrd_pid(config)
    if running is not None:
        return running
    argv = [repmgrd_binary(config), "-f", str(config.repmgr.path), "--daemonize"]
    LOG.info("starting %s", " ".join(argv))
    # output goes to a file, not a pipe: the daemonized child may keep it open for good
    try:
        started = process.start(argv)
    except CommandFailed as exc:
        raise _missing_bindir(exc, argv) from exc
    try:
        returncode = started.wait(timeout)
    except CommandFailed as exc:
        started.kill()
        raise CommandFailed(f"repmgrd did not daemonize within {timeout:g} s") from exc
    message = started.output_text().strip()
    started.close()
    if returncode != 0:
        raise CommandFailed(f"repmgrd exited {returncode}: {message}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = repmgrd_pid(config)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise CommandFailed(f"repmgrd started but wrote no pid file within {timeout:g} s; "
                        "set repmgrd_pid_file in repmgr.conf and see its log_file")


def stop_repmgrd(config: Config, timeout: float = 15.0) -> int | None:
    pid = repmgrd_pid(config)
    if pid is None:
        return None
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and repmgrd_pid(config) == pid:
        time.sleep(0.05)
    if repmgrd_pid(config) == pid:
        raise CommandFailed(f"repmgrd (pid {pid}) did not stop within {timeout:g} s")
    return pid
