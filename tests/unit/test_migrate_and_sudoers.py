"""The seed's env file migration, and sudoers rules that allow exactly our command lines."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.adapters.network import PrivilegedCommands
from repmgr_vip.cli.main import main
from repmgr_vip.config.schema import load_config
from repmgr_vip.core.errors import ExitCode

SEED_ENV = """\
export VIP=172.20.0.115
export INTERFACE=eth0
export REPMGR_DIR=/var/lib/pgsql/12/repmgr
export PGBINDIR=/usr/pgsql-12/bin
"""


def test_init_from_seed_env_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / ".repmgr_env"
    env.write_text(SEED_ENV)
    out = tmp_path / "repmgr-vip.toml"
    assert main(["init", "--from-env", str(env), "--prefix-length", "16", "-o", str(out)]) == 0
    written = tomllib.loads(out.read_text())
    assert written["repmgr_config"] == "/var/lib/pgsql/12/repmgr/repmgr.conf"
    assert written["vip"] == {"address": "172.20.0.115/16", "interface": "eth0"}
    assert "PGBINDIR" in capsys.readouterr().err
    # a second run does not clobber the file
    assert main(["init", "--from-env", str(env), "--prefix-length", "16", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_init_without_prefix_asks_for_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = tmp_path / ".repmgr_env"
    env.write_text(SEED_ENV)
    assert main(["init", "--from-env", str(env)]) == ExitCode.USAGE
    assert "--prefix-length" in capsys.readouterr().err


def test_init_reads_the_file_as_data_never_as_shell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = tmp_path / ".repmgr_env"
    marker = tmp_path / "pwned"
    env.write_text(f"VIP='$(touch {marker})/16'\nINTERFACE=eth0\nREPMGR_DIR=/x\n")
    assert main(["init", "--from-env", str(env)]) == ExitCode.USAGE
    assert not marker.exists()
    assert "not an IP address" in capsys.readouterr().err


def test_sudoers_allows_exactly_the_commands_we_run(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config()
    assert main(["-c", str(path), "sudoers"]) == 0
    rules = capsys.readouterr().out
    commands = PrivilegedCommands.from_config(load_config(path)).all()
    assert len(commands) == 6
    # the root helpers (arp.helper_prove, tcpreset.helper_refuse): this interface and address
    assert [argv[1:] for argv in commands[-2:]] == [["arp-prove", "lo", "192.0.2.115"],
                                                     ["refuse-stale", "lo", "192.0.2.115"]]
    for argv in commands:
        assert " ".join(argv) in rules
    assert "postgres ALL=(root) NOPASSWD: REPMGR_VIP_LO_192_0_2_115" in rules
    # no wildcard and no bare binary that would allow arbitrary arguments
    assert "*" not in rules.replace("# ", "")
    for line in rules.splitlines():
        if line.startswith("#"):
            continue
        for part in line.replace("\\", "").split(","):
            part = part.strip()
            if part.endswith(("/ip", "/arping")):
                pytest.fail(f"bare binary allowed: {part}")
