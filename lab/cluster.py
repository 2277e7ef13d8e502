"""The lab itself: namespaces, sshd, PostgreSQL and repmgr wired into a cluster."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from lab.faults import FaultsMixin
from lab.netns import (
    _mac_for,
    _prefix_namespaces,
    cleanup,
    fresh_prefix,
    sudoers_file_for,
    workdir_for,
)
from lab.observe import NetnsReader, ObserveMixin
from lab.prereq import ensure_postgres_account, missing_prerequisites
from lab.procs import (
    _base_env,
    _has_pid,
    _ip,
    _killpg,
    _mkdir,
    _parallel,
    _postgres_ids,
    _write,
    enable_reaper,
    list_netns,
    run_cmd,
)
from lab.settings import (
    CLIENT_IP,
    INTERFACE,
    IP_BIN,
    PG_BIN,
    PG_PORT,
    PG_USER,
    PREFIX_RE,
    REPMGR_DB,
    REPMGR_USER,
    RUNUSER,
    SSH,
    SSH_KEYGEN,
    SSHD,
    SUBNET,
    SUBNET6,
    SUDOERS_DIR,
    SYSCTL,
    VIP_IP,
    VISUDO,
    WITNESS_IP,
    WITNESS_NODE_ID,
    LabError,
    Node,
    ipv6_of,
    log,
)


def _quote_conf(value: str) -> str:
    """Quote a value for repmgr.conf / postgresql.conf."""
    return "'" + value.replace("'", "''") + "'"


class Lab(FaultsMixin, ObserveMixin):
    """A cluster of namespaced nodes; use as a context manager so down() always runs."""

    def __init__(
        self, nodes: int = 3, prefix: str | None = None, witness: bool = False, cluster: bool = True
    ) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("nodes must be between 1 and 9")
        if prefix is None:
            prefix = fresh_prefix()
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} must match {PREFIX_RE.pattern}")
        self.prefix = prefix
        self.workdir = workdir_for(prefix)
        self.cluster = cluster
        self.bridge_ns = f"{prefix}-br"
        self.client_ns = f"{prefix}-cl"
        self.client_mac = _mac_for(prefix, 100)
        self.ssh_dir = self.workdir / "ssh"
        self.ssh_key = self.ssh_dir / "id_ed25519"
        self.nodes: list[Node] = [self._make_node(i) for i in range(1, nodes + 1)]
        self.witness: Node | None = self._make_node(WITNESS_NODE_ID) if witness else None
        self.sudoers_file: Path | None = None
        self.timings: dict[str, float] = {}
        self._popens: list[subprocess.Popen[str]] = []
        self._owns_prefix = True
        self._is_up = False
        self._lock = threading.Lock()
        self._readers: dict[str, NetnsReader] = {}
        self._readers_lock = threading.Lock()

    def _make_node(self, node_id: int) -> Node:
        """Describe node i (or the witness) before anything exists."""
        is_witness = node_id == WITNESS_NODE_ID
        name = "witness" if is_witness else f"node{node_id}"
        ip = WITNESS_IP if is_witness else f"192.0.2.{10 + node_id}"
        netns = f"{self.prefix}-w" if is_witness else f"{self.prefix}-n{node_id}"
        ndir = self.workdir / name
        return Node(
            name=name,
            node_id=node_id,
            netns=netns,
            ip=ip,
            mac=_mac_for(self.prefix, int(ip.rsplit(".", 1)[1])),
            dir=ndir,
            repmgr_conf=ndir / "repmgr.conf",
            socket_dir=ndir / "run",
            datadir=ndir / "data",
            is_witness=is_witness,
        )

    @property
    def all_nodes(self) -> list[Node]:
        """Data nodes followed by the witness, if any."""
        return self.nodes + ([self.witness] if self.witness else [])

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this run creates."""
        return [self.bridge_ns, self.client_ns] + [n.netns for n in self.all_nodes]

    @property
    def ssh_options(self) -> str:
        """ssh_options for repmgr.conf (repmgr adds -o BatchMode=yes itself)."""
        return " ".join(self.ssh_argv_options())

    def ssh_argv_options(self) -> list[str]:
        """The same ssh options as an argument list."""
        options = [
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "ConnectTimeout=2",
        ]
        return ["-q", *[arg for opt in options for arg in ("-o", opt)], "-i", str(self.ssh_key)]

    def node(self, name_or_id: str | int) -> Node:
        """Look a node up by name ('node2', 'witness'), namespace or node id."""
        for n in self.all_nodes:
            if str(name_or_id) in (n.name, n.netns, n.ip, str(n.node_id)):
                return n
        raise KeyError(f"no lab node {name_or_id!r}")

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> Self:
        """Build namespaces, sshd and (unless cluster=False) the repmgr cluster.

        On failure everything is torn down again and the error carries log tails.
        """
        if self._is_up:
            return self
        missing = missing_prerequisites()
        if missing:
            raise LabError("lab prerequisites missing: " + "; ".join(missing))
        if _prefix_namespaces(self.prefix, list_netns()) or self.workdir.exists():
            self._owns_prefix = False  # never tear down somebody else's run
            raise LabError(
                f"lab prefix {self.prefix} is in use; clean it with "
                f"`python3 -m lab down --prefix {self.prefix}`"
            )
        self._owns_prefix = True
        enable_reaper()
        t0 = time.monotonic()
        try:
            self._step("files", self._prepare_files)
            self._step("network", self._build_network)
            self._step("sshd", self._start_sshds)
            if self.cluster:
                self._step("cluster", self._build_cluster)
            self._step("ssh-check", self._verify_ssh)
            if self.cluster:
                self._step("streaming", self._wait_streaming)
        except BaseException as exc:
            diag = self._safe_diagnostics()
            keep = os.environ.get("RVLAB_KEEP_ON_FAILURE") == "1"
            if not keep:
                self.down()
            if isinstance(exc, Exception):
                msg = f"lab {self.prefix} failed to come up: {exc}\n{diag}"
                if keep:
                    msg += f"\n(kept: python3 -m lab down --prefix {self.prefix})"
                raise LabError(msg) from exc
            raise
        self.timings["up"] = time.monotonic() - t0
        self._is_up = True
        self._log(f"up in {self.timings['up']:.2f}s: {self.timings}")
        return self

    def down(self) -> None:
        """Tear everything of this run down; safe to call any number of times."""
        if not self._owns_prefix:
            return
        t0 = time.monotonic()
        for proc in self._popens:
            if proc.poll() is None:
                _killpg(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._popens.clear()
        self._close_readers()
        cleanup(self.prefix)
        self.sudoers_file = None
        self._is_up = False
        self.timings["down"] = time.monotonic() - t0
        log.info("lab %s down in %.2fs", self.prefix, self.timings["down"])

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one build step and remember how long it took."""
        t = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - t, 3)
        self._log(f"step {name} done in {self.timings[name]:.2f}s")

    def _log(self, msg: str) -> None:
        """Log to the logger and to workdir/lab.log (kept with the run's other logs)."""
        log.info("lab %s: %s", self.prefix, msg)
        with self._lock, contextlib.suppress(OSError), open(self.workdir / "lab.log", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def _prepare_files(self) -> None:
        """Workdir, per-node dirs, ssh keys; unlock the postgres account."""
        ensure_postgres_account()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir
        _mkdir(self.workdir, mode=0o755, owner="root")
        _mkdir(self.ssh_dir, mode=0o700)
        env = _base_env("root", None)
        for key, comment in ((self.ssh_key, "lab"), (self.ssh_dir / "host_ed25519", "lab-host")):
            keygen = [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(key)]
            run_cmd([*keygen, "-C", f"{comment}-{self.prefix}"], env=env)
        uid, gid = _postgres_ids()
        for path in (self.ssh_key, Path(f"{self.ssh_key}.pub")):
            os.chown(path, uid, gid)
        os.chmod(self.ssh_key, 0o600)
        pub = Path(f"{self.ssh_key}.pub").read_text()
        _write(self.ssh_dir / "authorized_keys", pub, mode=0o600)
        for n in self.all_nodes:
            _mkdir(n.dir, mode=0o755)
            _mkdir(n.socket_dir, mode=0o755)

    def _build_network(self) -> None:
        """Namespaces, the isolated bridge and one veth per host; no routes out."""
        for ns in self.namespaces:
            _ip("netns", "add", ns)
        br = self.bridge_ns
        _ip("-n", br, "link", "set", "lo", "up")
        _ip(
            "-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"
        )
        _ip("-n", br, "link", "set", "br0", "up")
        hosts: list[tuple[str, str, str, str]] = [
            (n.netns, n.veth, n.ip, n.mac) for n in self.all_nodes
        ]
        hosts.append((self.client_ns, "vc", CLIENT_IP, self.client_mac))
        for ns, veth, ip, mac in hosts:
            peer = ["peer", "name", veth, "netns", br]
            _ip("link", "add", INTERFACE, "address", mac, "netns", ns, "type", "veth", *peer)
            _ip("-n", br, "link", "set", veth, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", INTERFACE)
            _ip("-n", ns, "addr", "add", f"{ipv6_of(ip)}/64", "dev", INTERFACE, "nodad")
            run_cmd([IP_BIN, "netns", "exec", ns, SYSCTL, "-qw",
                     f"net.ipv6.conf.{INTERFACE}.ndisc_notify=1",
                     f"net.ipv6.conf.{INTERFACE}.router_solicitation_delay=0"], timeout=10)
            _ip("-n", ns, "link", "set", INTERFACE, "up")
        for n in self.all_nodes:
            info = json.loads(_ip("-n", n.netns, "-j", "link", "show", "dev", INTERFACE).stdout)
            if info[0]["address"] != n.mac:
                raise LabError(f"{n.name}: eth0 has MAC {info[0]['address']}, expected {n.mac}")

    def _sshd_argv(self, n: Node) -> list[str]:
        """sshd for one node, listening on the node's address only."""
        options = {
            "ListenAddress": n.ip,
            "Port": "22",
            "HostKey": str(self.ssh_dir / "host_ed25519"),
            "PidFile": str(n.socket_dir / "sshd.pid"),
            "AuthorizedKeysFile": str(self.ssh_dir / "authorized_keys"),
            "StrictModes": "no",  # the workdir is not root-owned all the way
            "UsePAM": "no",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "PermitRootLogin": "no",
            "AllowUsers": PG_USER,
            "UseDNS": "no",
            "LogLevel": "VERBOSE",
        }
        argv = [SSHD, "-f", "/dev/null", "-E", str(n.dir / "sshd.log")]
        for key, value in options.items():
            argv += ["-o", f"{key}={value}"]
        return argv

    def _start_sshds(self) -> None:
        """One sshd per node inside its namespace (repmgr switchover needs ssh)."""
        for n in self.all_nodes:
            self.run(n, self._sshd_argv(n), user="root", timeout=10)
        for n in self.all_nodes:
            pid_file = n.socket_dir / "sshd.pid"
            self.wait_for(
                functools.partial(_has_pid, pid_file), 5, 0.02, f"sshd pid file on {n.name}"
            )

    def _verify_ssh(self) -> None:
        """postgres can ssh between every ordered pair of nodes (switchover needs it)."""
        pairs = [(a, b) for a in self.all_nodes for b in self.all_nodes if a != b]

        def check(pair: tuple[Node, Node]) -> None:
            a, b = pair
            res = self.ssh(a, b, "true", check=False, timeout=15)
            if res.returncode != 0:
                raise LabError(
                    f"ssh {a.name} -> {b.name} failed ({res.returncode}): {res.stderr.strip()}"
                )

        _parallel(check, pairs)
        if self.cluster and len(self.nodes) > 1:
            # repmgr runs its remote commands exactly like this: absolute
            # repmgr_bindir path, the remote node's own config file.
            a, b = self.nodes[0], self.nodes[1]
            res = self.ssh(
                a,
                b,
                f"{PG_BIN}/repmgr -f {b.repmgr_conf} node check --role",
                check=False,
                timeout=20,
            )
            if res.returncode != 0 or "OK" not in res.stdout:
                raise LabError(
                    f"repmgr node check over ssh {a.name} -> {b.name} failed: "
                    f"rc={res.returncode} out={res.stdout!r} err={res.stderr!r}"
                )

    def _postgresql_conf(self) -> str:
        """Settings shared by every node (cloned to the standbys)."""
        return f"""
# --- repmgr-vip lab ---
port = {PG_PORT}
wal_level = replica
hot_standby = on
max_wal_senders = 20  # 7 nodes: six clones at once, 2 senders each
max_replication_slots = 20
wal_log_hints = on
wal_keep_size = '128MB'
shared_preload_libraries = 'repmgr'
max_connections = 50
shared_buffers = '16MB'
dynamic_shared_memory_type = mmap
fsync = off
wal_retrieve_retry_interval = '1s'
wal_receiver_status_interval = '1s'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
# Per-node settings (listen_addresses, socket dir) live outside the data
# directory, in DIR/postgresql.node.conf: pg_basebackup and pg_rewind copy
# everything inside it from the source node.
include_if_exists = '../postgresql.node.conf'
"""

    def _node_conf(self, n: Node) -> str:
        """Node-specific PostgreSQL settings (kept out of reach of clone and rewind)."""
        return (
            # '*' as on real servers, so that clients reach PostgreSQL through the VIP too
            "listen_addresses = '*'\n"
            f"unix_socket_directories = {_quote_conf(str(n.socket_dir))}\n"
            f"cluster_name = {_quote_conf(n.name)}\n"
        )

    @staticmethod
    def _pg_hba() -> str:
        """Trust everything inside the lab subnet and over the unix socket."""
        return (
            "local all all trust\n"
            "local replication all trust\n"
            f"host all all {SUBNET} trust\n"
            f"host replication all {SUBNET} trust\n"
            f"host all all {SUBNET6} trust\n"
            "host all all 127.0.0.1/32 trust\n"
        )

    def _repmgr_conf(self, n: Node) -> str:
        """repmgr.conf with fast failure detection and pg_ctl logging into the node dir."""
        conf = str(n.repmgr_conf)
        data = str(n.datadir)
        pg_ctl = f"{PG_BIN}/pg_ctl"
        priority = 0 if n.is_witness else (100 if n.node_id == 1 else 100 - n.node_id)
        settings: list[tuple[str, str]] = [
            ("node_id", str(n.node_id)),
            ("node_name", _quote_conf(n.name)),
            ("conninfo", _quote_conf(n.conninfo)),
            ("data_directory", _quote_conf(data)),
            ("pg_bindir", _quote_conf(PG_BIN)),
            ("repmgr_bindir", _quote_conf(PG_BIN)),
            ("log_file", _quote_conf(str(n.repmgr_log))),
            ("log_level", "'INFO'"),
            ("repmgrd_pid_file", _quote_conf(str(n.repmgrd_pid_file))),
            ("use_replication_slots", "yes"),
            ("location", "'lab'"),
            ("priority", str(priority)),
            ("failover", "'automatic'"),
            (
                "promote_command",
                _quote_conf(f"{PG_BIN}/repmgr standby promote -f {conf} --log-to-file"),
            ),
            (
                "follow_command",
                _quote_conf(
                    f"{PG_BIN}/repmgr standby follow -f {conf} --log-to-file --upstream-node-id=%n"
                ),
            ),
            ("monitor_interval_secs", "1"),
            ("reconnect_attempts", "3"),
            ("reconnect_interval", "1"),
            (
                "service_start_command",
                _quote_conf(f"{pg_ctl} -D {data} -w -t 60 -l {n.pg_log} start"),
            ),
            ("service_stop_command", _quote_conf(f"{pg_ctl} -D {data} -w -t 60 -m fast stop")),
            (
                "service_restart_command",
                _quote_conf(f"{pg_ctl} -D {data} -w -t 60 -m fast -l {n.pg_log} restart"),
            ),
            ("ssh_options", _quote_conf(self.ssh_options)),
        ]
        return "".join(f"{k}={v}\n" for k, v in settings)

    def _initdb(self, n: Node) -> None:
        """A fresh data directory with the lab's settings."""
        argv = [f"{PG_BIN}/initdb", "-D", str(n.datadir), "-U", PG_USER, "-A", "trust"]
        argv += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        self.run(n, argv, timeout=120)
        with open(n.datadir / "postgresql.conf", "a") as fh:
            fh.write(self._postgresql_conf())
        _write(n.datadir / "pg_hba.conf", self._pg_hba(), mode=0o600)

    def _create_repmgr_db(self, n: Node) -> None:
        """repmgr superuser and database, as repmgr's docs prescribe."""
        self.psql(n, f"CREATE ROLE {REPMGR_USER} SUPERUSER REPLICATION LOGIN", dbname="postgres")
        self.psql(n, f"CREATE DATABASE {REPMGR_DB} OWNER {REPMGR_USER}", dbname="postgres")
        self.psql(
            n,
            f'ALTER ROLE {REPMGR_USER} SET search_path TO repmgr, "$user", public',
            dbname="postgres",
        )

    def _build_cluster(self) -> None:
        """initdb + register node1, clone the standbys, optional witness."""
        for n in self.all_nodes:
            _write(n.repmgr_conf, self._repmgr_conf(n))
            _write(n.dir / "postgresql.node.conf", self._node_conf(n), mode=0o600)
        primary = self.nodes[0]

        def setup_primary() -> None:
            self._initdb(primary)
            self.start_postgres(primary)
            self._create_repmgr_db(primary)
            self.repmgr(primary, "primary", "register")

        def setup_witness_db() -> None:
            assert self.witness is not None
            self._initdb(self.witness)
            self.start_postgres(self.witness)
            self._create_repmgr_db(self.witness)

        steps: list[Callable[[], None]] = [setup_primary]
        if self.witness is not None:
            steps.append(setup_witness_db)
        _parallel(lambda f: f(), steps)

        def clone(n: Node) -> None:
            upstream = ["-h", primary.ip, "-U", REPMGR_USER, "-d", REPMGR_DB]
            self.repmgr(n, *upstream, "standby", "clone", "--fast-checkpoint", timeout=120)
            self.start_postgres(n)
            # register checks that the standby streams; right after start it may still be
            # in "catchup", so wait for the primary to see it streaming first
            self.wait_for(
                lambda: self.psql(
                    primary,
                    "SELECT count(*) FROM pg_stat_replication "
                    f"WHERE application_name = '{n.name}' AND state = 'streaming'",
                    dbname="postgres",
                ) == "1",
                60,
                what=f"{n.name} streaming before register",
            )
            self.repmgr(n, "standby", "register")

        def witness_register() -> None:
            assert self.witness is not None
            self.repmgr(self.witness, "witness", "register", "-h", primary.ip)

        tasks: list[Callable[[], None]] = [functools.partial(clone, n) for n in self.nodes[1:]]
        if self.witness is not None:
            tasks.append(witness_register)
        _parallel(lambda f: f(), tasks)

    def _wait_streaming(self) -> None:
        """Every standby streams from node1 before up() returns."""
        primary = self.nodes[0]
        want = len(self.nodes) - 1
        self.wait_for(
            lambda: self.streaming_count(primary) >= want,
            30,
            0.05,
            f"{want} streaming standbys on {primary.name}",
        )

    def _exec_argv(self, node: Node | None, argv: Sequence[str], user: str) -> list[str]:
        """ip netns exec NS [runuser -u USER --] argv."""
        ns = self.client_ns if node is None else node.netns
        cmd = [IP_BIN, "netns", "exec", ns]
        if user != "root":
            cmd += [RUNUSER, "-u", user, "--"]
        return cmd + list(argv)

    def run(
        self,
        node: Node | None,
        argv: Sequence[str],
        *,
        user: str = PG_USER,
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in a node's namespace (None: the client's) as `user` ("root": no runuser)."""
        return run_cmd(
            self._exec_argv(node, argv, user),
            check=check,
            timeout=timeout,
            env=_base_env(user, env),
            input=input,
        )

    def popen(
        self,
        node: Node | None,
        argv: Sequence[str],
        *,
        user: str = PG_USER,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start argv in the background in a node's namespace; killed by down()."""
        proc = subprocess.Popen(
            self._exec_argv(node, argv, user),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=_base_env(user, env),
            text=True,
            start_new_session=True,
        )
        self._popens.append(proc)
        return proc

    def ssh(
        self, src: Node, dst: Node, command: str, *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """ssh as postgres from src to dst with repmgr's ssh_options."""
        return self.run(
            src,
            [SSH, *self.ssh_argv_options(), f"{PG_USER}@{dst.ip}", command],
            check=check,
            timeout=timeout,
        )

    def repmgr(
        self, node: Node, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """PG_BIN/repmgr -f node.repmgr_conf ARGS as postgres in the node's namespace."""
        return self.run(
            node,
            [f"{PG_BIN}/repmgr", "-f", str(node.repmgr_conf), *args],
            check=check,
            timeout=timeout,
        )

    def psql(self, node: Node, sql: str, *, dbname: str = REPMGR_DB, timeout: float = 10) -> str:
        """Run SQL over the node's unix socket as postgres; stripped -At output."""
        argv = [f"{PG_BIN}/psql", "-h", str(node.socket_dir), "-p", str(PG_PORT)]
        argv += ["-U", PG_USER, "-d", dbname, "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql]
        connect_timeout = str(max(1, min(5, int(timeout))))
        res = self.run(node, argv, timeout=timeout, env={"PGCONNECT_TIMEOUT": connect_timeout})
        return res.stdout.strip()

    def is_in_recovery(self, node: Node) -> bool | None:
        """pg_is_in_recovery(), or None if the node does not answer within 3 s."""
        try:
            out = self.psql(node, "SELECT pg_is_in_recovery()", dbname="postgres", timeout=3)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None
        return {"t": True, "f": False}.get(out)

    def primary(self) -> Node | None:
        """The data node not in recovery; None if none; LabError if several."""
        primaries = [n for n in self.nodes if self.is_in_recovery(n) is False]
        if len(primaries) > 1:
            raise LabError("more than one primary: " + ", ".join(n.name for n in primaries))
        return primaries[0] if primaries else None

    def streaming_count(self, node: Node) -> int:
        """Number of walsenders in state 'streaming' on node (0 if unreachable)."""
        try:
            out = self.psql(
                node,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                dbname="postgres",
                timeout=3,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return 0
        return int(out or 0)

    def timeline(self, node: Node) -> int | None:
        """The node's current timeline (None if unreachable): higher wins.

        Not pg_control_checkpoint() alone: after a promotion it shows the old
        timeline until the next checkpoint (seconds); the WAL file name does not.
        """
        sql = (
            "SELECT CASE WHEN pg_is_in_recovery() THEN COALESCE("
            "(SELECT received_tli FROM pg_stat_wal_receiver),"
            " (SELECT timeline_id FROM pg_control_checkpoint()))"
            " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))"
            "::bit(32)::int END"
        )
        try:
            out = self.psql(node, sql, dbname="postgres", timeout=3)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None
        return int(out) if out.isdigit() else None

    def cluster_show(self, node: Node | None = None) -> list[tuple[int, int, int]]:
        """`repmgr cluster show --csv` rows: (node_id, connection_status, recovery_type)."""
        res = self.repmgr(node or self.nodes[0], "cluster", "show", "--csv", check=False)
        rows: list[tuple[int, int, int]] = []
        for line in res.stdout.splitlines():
            parts = line.strip().split(",")
            if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts):
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        return rows

    def append_repmgr_conf(self, node: Node, text: str) -> None:
        """Append lines to repmgr.conf; repmgr takes the last value of a repeated key.

        repmgrd reads the file when it starts, so restart it to apply changes.
        """
        with open(node.repmgr_conf, "a") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")

    def set_repmgr_conf(self, node: Node, key: str, value: str, *, quote: bool = True) -> None:
        """Replace (or add) one key in repmgr.conf."""
        line = f"{key}={_quote_conf(value) if quote else value}"
        lines = node.repmgr_conf.read_text().splitlines()
        pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
        kept = [ln for ln in lines if not pat.match(ln)]
        _write(node.repmgr_conf, "\n".join([*kept, line]) + "\n")

    def client_psql(
        self,
        sql: str,
        *,
        host: str = VIP_IP,
        dbname: str = REPMGR_DB,
        user: str = REPMGR_USER,
        timeout: float = 10,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """psql over TCP from the client namespace, as an application would reach the VIP.

        Also fills the client's neighbour table (arping does not).
        """
        connect = max(1, min(5, int(timeout)))
        conninfo = (
            f"host={host} port={PG_PORT} dbname={dbname} user={user} connect_timeout={connect}"
        )
        return self.run(
            None,
            [f"{PG_BIN}/psql", conninfo, "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=check,
            timeout=timeout,
        )

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = ""
    ) -> None:
        """Poll predicate until true; TimeoutError naming `what` (and the last error)."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                if predicate():
                    return
                last_exc = None
            except Exception as exc:
                last_exc = exc
            if time.monotonic() >= deadline:
                msg = f"timed out after {timeout:g}s waiting for {what or predicate!r}"
                if last_exc is not None:
                    msg += f" (last error: {last_exc!r})"
                raise TimeoutError(msg)
            time.sleep(interval)

    def install_sudoers(self, text: str) -> Path:
        """Validate with visudo -cf and install /etc/sudoers.d/repmgr-vip-lab-PREFIX (0440)."""
        if not text.endswith("\n"):
            text += "\n"
        # Cmnd_Alias names are global to sudo: two labs installing the same VIP's rules at
        # once would define one alias twice, and sudo then refuses every rule on the machine
        for alias in set(re.findall(r"^Cmnd_Alias\s+(\w+)", text, re.MULTILINE)):
            text = re.sub(rf"\b{alias}\b", f"{alias}_{self.prefix.upper()}", text)
        final = sudoers_file_for(self.prefix)
        # sudo ignores files with a '.' in their name: the temp file is inert.
        tmp = SUDOERS_DIR / f".{final.name}.tmp"
        tmp.write_text(text)
        try:
            os.chmod(tmp, 0o440)
            run_cmd([VISUDO, "-cf", str(tmp)], env=_base_env("root", None))
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.sudoers_file = final
        return final
