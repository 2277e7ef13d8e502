"""The command's entry point, with a quick start for promote_command.

Every millisecond before `repmgr standby promote` starts is client outage, and the full CLI
costs 50-80 ms of imports and configuration before it can even ask the daemon. The hook line
that `repmgr-vip repmgr-conf` writes names the daemon's control socket
(`promote --control PATH`), so this module asks the daemon with the standard library alone:
it checks that the socket belongs to its own user or root (SO_PEERCRED on the client side
too), lets the daemon fence and add the VIP, and runs the repmgr command line the daemon's
verdict carries. Anything unexpected before the verdict (no daemon, an old hook line, a
refusal, a timeout) falls back to the full CLI, which does the step itself as always. When
nothing listens at the socket (no daemon), the old primary's release goes out first
(adapters/early.py), while the full CLI loads.

Kept import-light on purpose: until the fallback, only the standard library and this
package's modules written on it alone (procstart, early, statepaths, jsonline), and of it only
what Python loads anyway or is built in. `json` and `socket` would load `re`, `enum` and
`selectors` (about 8 ms here, more on a host busy with a failover); their C halves (`_json`,
`_socket`) do the same work. The Debian package starts this module with `python3 -I -S`
(debian/repmgr-vip-entry): no site-packages scan until the fallback needs it.
"""

from __future__ import annotations

import _socket
import os
import struct
import sys
import time

from repmgr_vip.adapters.early import anonymous_output, spawn, start_releases
from repmgr_vip.adapters.procstart import process_start_time
from repmgr_vip.core.jsonline import dumps, loads

TYPE_CHECKING = False  # typing itself costs this hook milliseconds
if TYPE_CHECKING:
    from repmgr_vip.adapters.early import EarlyChild

PROTOCOL = 1  # adapters/control.py's
CONNECT_BOUND = 0.2  # connect + greeting, as control.CONNECT_BOUND
VERDICT_WAIT = 300.0  # the daemon bounds its fencing round itself; this is the backstop
AFTER_PROMOTE_WAIT = 60.0  # hooks.AFTER_PROMOTE_WAIT
MAX_LINE = 64 * 1024
_UCRED = struct.Struct("3i")


class Fallback(Exception):
    """The quick start cannot go on; the full CLI takes over (the reason is logged there).

    ask_again: nothing listens at the hook line's path (no daemon, or state_dir changed
    since the line was written): the full CLI looks at the configured socket itself."""

    def __init__(self, reason: str, *, ask_again: bool = False) -> None:
        super().__init__(reason)
        self.ask_again = ask_again


def main() -> int:
    """`repmgr-vip`: the quick promote when the arguments are the generated hook line's."""
    if len(sys.argv) == 4 and sys.argv[1] == "refuse-stale":
        # a root helper a release waits for (tcpreset): no configuration, no site packages
        from repmgr_vip.adapters.tcpreset import refuse_main

        return refuse_main(sys.argv[2], sys.argv[3])
    if len(sys.argv) == 4 and sys.argv[1] == "arp-prove":
        # the root helper of a promotion's fencing round (arp): the same
        from repmgr_vip.adapters import arp

        return arp.helper_main(arp.helper_prove, sys.argv[2], sys.argv[3], "ARP proof")
    control = quick_promote_socket(sys.argv[1:])
    skipped = ""
    early: list[EarlyChild] = []
    if control is not None:
        try:
            return promote(control)
        except Fallback as exc:
            if not exc.ask_again:
                skipped = str(exc)
            else:  # no daemon: the old primary's release goes out now, not after the imports
                early = start_releases(control, sys.argv[2])
    full_paths()
    if skipped:
        from repmgr_vip.app import hooks

        hooks.DAEMON_SKIPPED = skipped  # do not ask the daemon a second time
    from repmgr_vip.cli.main import main as full

    if not early:
        return full()
    from repmgr_vip.adapters import process

    process.adopt(early)  # the fencing round's process.start takes them over
    try:
        return full()
    finally:
        process.stop_unadopted()


def full_paths() -> None:
    """Started with -S (the package's entry): the site directories the full CLI's imports
    (psycopg, prometheus_client) live in, without running their .pth files: code that any
    installed package may drop there, run by a hook and by a root helper alike, which our
    imports do not need (one such file cost 20 ms of every start on the lab's host)."""
    if sys.flags.no_site:
        import site

        for path in site.getsitepackages():
            if path not in sys.path:
                sys.path.append(path)


def quick_promote_socket(args: list[str]) -> str | None:
    """The control socket of exactly `-c CONFIG promote --control PATH`, else None."""
    if len(args) == 5 and args[0] == "-c" and args[2] == "promote" and args[3] == "--control":
        return args[4]
    return None


class Line:
    """One connection to the daemon, JSON lines both ways, every read with a deadline."""

    def __init__(self, path: str) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.buffer = b""
        try:
            self.sock.settimeout(CONNECT_BOUND)
            self.sock.connect(path)
            _, uid, _ = _UCRED.unpack(self.sock.getsockopt(
                _socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise Fallback(f"not running at {path}", ask_again=True) from None
        except OSError as exc:
            self.sock.close()
            raise Fallback(f"not reachable at {path} ({exc.strerror or exc})") from None
        if uid not in (os.geteuid(), 0):  # someone else's socket: never take its verdict
            self.sock.close()
            raise Fallback(f"{path} belongs to uid {uid}, neither this user nor root")

    def send(self, message: dict[str, object]) -> bool:
        try:
            self.sock.sendall((dumps(message) + "\n").encode())
        except OSError:
            return False
        return True

    def receive(self, timeout: float) -> dict[str, object] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk or len(self.buffer) + len(chunk) > MAX_LINE:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = loads(line)
        except ValueError:  # UnicodeDecodeError too
            return None
        return message if isinstance(message, dict) else None

    def close(self) -> None:
        self.sock.close()


def promote(control: str) -> int:
    """Asks the daemon to fence, runs repmgr as its verdict says; repmgr's status.

    Fallback before the verdict; after it, a daemon that vanishes leaves the VIP step to
    the full code (hooks.vip_after_lost_daemon), as in hooks._promote_via_daemon.
    """
    started = process_start_time()
    line = Line(control)
    try:
        hello = line.receive(CONNECT_BOUND)
        if hello is None or hello.get("hello") != PROTOCOL:
            raise Fallback("gave no greeting" if hello is None else f"refused: {hello}")
        asked = time.time()
        rid = f"{os.getpid()}-{os.urandom(6).hex()}"
        if not line.send({"op": "promote", "id": rid, "quick": True}):
            raise Fallback("closed the connection")
        verdict = line.receive(VERDICT_WAIT)
        if verdict is None or not verdict.get("ok"):
            raise Fallback(f"gave no verdict ({verdict})")
        if "raise" in verdict:
            print(f"repmgr-vip: {verdict['raise']}", file=sys.stderr)
            return _code(verdict.get("code"))
        if "exit" in verdict:  # refused; the daemon journaled why
            return _code(verdict["exit"])
        argv, env = verdict.get("argv"), verdict.get("env", {})
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise Fallback("sent no repmgr command line")
        if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise Fallback("sent a bad environment")
        status, output = _run(argv, env, line, started, asked, time.time())
        reply = line.receive(AFTER_PROMOTE_WAIT) if line.send(
            {"op": "promoted", "status": status, "output": output}) else None
    finally:
        line.close()
    if reply is None and verdict.get("want_vip"):
        unconfirmed = verdict.get("unconfirmed")
        _after_lost_daemon(status, [str(n) for n in unconfirmed]
                           if isinstance(unconfirmed, list) else [])
    return status


def _code(value: object) -> int:
    """An exit code the daemon sent; 1 (failed) if it is not one."""
    return value if isinstance(value, int) and 0 <= value < 256 else 1


def _run(argv: list[str], env: dict[str, str], line: Line, started: float | None,
         asked: float, verdict: float) -> tuple[int, str]:
    """repmgr standby promote, output to an unnamed file (never a pipe that could fill up;
    not `tempfile`, whose imports cost this hook milliseconds)."""
    output = anonymous_output()
    try:
        try:  # posix_spawn, not subprocess: its imports cost this hook milliseconds too
            pid = spawn(argv, output, env={**os.environ, **env}, search=True)
        except OSError as exc:
            text = f"{argv[0]} cannot be run ({exc.strerror}); set pg_bindir in repmgr.conf"
            print(f"repmgr-vip: {text}", file=sys.stderr)
            return 1, text
        line.send({"op": "started", "at": time.time(), "process_start": started,
                   "asked": asked, "verdict": verdict})
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return (status if status >= 0 else 128 - status,
                os.pread(output, MAX_LINE // 2, 0).decode(errors="replace"))
    finally:
        os.close(output)


def _after_lost_daemon(status: int, unconfirmed: list[str]) -> None:
    """The daemon fenced, then vanished before the VIP was settled: the full code adds it."""
    full_paths()
    from repmgr_vip.adapters.log import LOG, setup_logging_for
    from repmgr_vip.app import hooks
    from repmgr_vip.config.schema import load_config, resolve_config_path

    config = load_config(resolve_config_path(sys.argv[2]))
    setup_logging_for(config)
    LOG.error("promote: the daemon vanished after its verdict; taking the VIP step here")
    hooks.vip_after_lost_daemon(config, status, unconfirmed)
