"""Configuration: defaults, repmgr.conf reading, and one clear line + exit 2 for bad input."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from repmgr_vip.cli.main import main
from repmgr_vip.config.repmgrconf import parse_repmgr_conf_text
from repmgr_vip.config.schema import load_config, render_toml
from repmgr_vip.core.conninfo import parse_conninfo
from repmgr_vip.core.errors import ConfigError, ExitCode


def test_minimal_config_takes_repmgr_values_and_defaults(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config())
    assert config.vip.cidr == "192.0.2.115/24"
    assert config.vip.ip == "192.0.2.115"
    assert config.vip.interface == "lo"
    assert config.repmgr.node_id == 2
    assert config.repmgr.node_name == "pg-b"
    assert config.repmgr.ssh_options == "-q -o ConnectTimeout=5"
    assert config.repmgr.reconnect_attempts == 3
    assert config.repmgr.reconnect_interval == 2
    assert config.repmgr.repmgr_binary == "/usr/lib/postgresql/15/bin/repmgr"
    assert config.vip.announce_count >= 3
    assert config.state_dir == Path(config.repmgr.data_directory).parent
    assert config.commands.ip.endswith("/ip")


def test_repmgr_conf_quoting_rules() -> None:
    values = parse_repmgr_conf_text(
        "a='it''s'\nb = 'x\\'y' # c\nc=plain # comment\n#d=1\n  e  =  'sp ace'  \n"
    )
    assert values == {"a": "it's", "b": "x'y", "c": "plain", "e": "sp ace"}


def test_repmgr_conf_unterminated_quote_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unterminated"):
        parse_repmgr_conf_text("conninfo='host=x\n")


@pytest.mark.parametrize(
    ("conninfo", "expected"),
    [
        (
            "host=10.0.0.1 port=5432 user=repmgr",
            {"host": "10.0.0.1", "port": "5432", "user": "repmgr"},
        ),
        ("host = 'a b' dbname=x", {"host": "a b", "dbname": "x"}),
        (
            "postgresql://repmgr@db1:5433/repmgr?connect_timeout=2",
            {
                "host": "db1",
                "port": "5433",
                "user": "repmgr",
                "dbname": "repmgr",
                "connect_timeout": "2",
            },
        ),
    ],
)
def test_conninfo_forms(conninfo: str, expected: dict[str, str]) -> None:
    assert parse_conninfo(conninfo) == expected


def test_effective_config_round_trips_as_toml(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config())
    again = tomllib.loads(render_toml(config.values))
    assert again["vip"]["address"] == "192.0.2.115/24"
    assert again["daemon"]["interval"] == config.daemon.interval


BAD_INPUTS = [
    # (description, kwargs for write_config, words the one-line message must contain)
    ("unknown top-level key", {"extra": "colour = 'blue'"}, ["colour", "remove it"]),
    ("unknown [vip] key", {"address": '192.0.2.115/24"\nadress = "x'}, ["vip.adress"]),
    ("VIP not an IP", {"address": "192.0.2.300/24"}, ["vip.address", "not an IP address"]),
    ("VIP a host name", {"address": "db-vip/24"}, ["vip.address", "not an IP address"]),
    ("VIP without prefix", {"address": "192.0.2.115"}, ["vip.address", "prefix length"]),
    ("bad prefix", {"address": "192.0.2.115/33"}, ["vip.address", "1..32"]),
    ("bad prefix text", {"address": "192.0.2.115/x"}, ["vip.address", "1..32"]),
    ("IPv6 VIP without prefix", {"address": "2001:db8::15"}, ["vip.address", "prefix"]),
    ("VIP = node's own address", {"address": "192.0.2.12/24"}, ["own address"]),
    ("missing interface", {"interface": "nosuch0"}, ["vip.interface", "does not exist"]),
    ("invalid interface name", {"interface": "eth0; reboot"}, ["vip.interface", "not a valid"]),
    ("unreadable repmgr.conf", {"extra": ""}, ["repmgr_config", "cannot read"]),
    ("wrong type", {"extra": "[privileges]\nmode = 3"}, ["privileges.mode", "must be a str"]),
    ("bad choice", {"extra": "[privileges]\nmode = 'root'"}, ["privileges.mode", "one of"]),
    ("negative count", {"extra": "[fencing]\nfence_timeout = -1"}, ["fencing.fence_timeout"]),
    ("kex with an option in it", {"extra": "[fencing]\nssh_kex_first = 'x -oProxyCommand=y'"},
     ["fencing.ssh_kex_first"]),
]


@pytest.mark.parametrize(("what", "kwargs", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_2(
    what: str,
    kwargs: dict[str, str],
    words: list[str],
    write_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(**kwargs)
    if what == "unreadable repmgr.conf":
        text = path.read_text().replace(str(tmp_path / "repmgr.conf"), str(tmp_path / "nope"))
        path.write_text(text)
    if "[" in kwargs.get("extra", ""):
        # sections must come after the top-level keys: move the extra table to the end
        body = path.read_text().replace(kwargs["extra"], "") + kwargs["extra"] + "\n"
        path.write_text(body)
    assert main(["-c", str(path), "config"]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (what, err)


def test_missing_required_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[vip]\naddress = '192.0.2.115/24'\ninterface = 'lo'\n")
    assert main(["-c", str(path), "config"]) == ExitCode.USAGE
    assert "repmgr_config is required" in capsys.readouterr().err


def test_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("VIP=1.2.3.4\n")
    assert main(["-c", str(path), "config"]) == ExitCode.USAGE
    assert "not valid TOML" in capsys.readouterr().err


def test_missing_config_file_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", str(tmp_path / "absent.toml"), "config"]) == ExitCode.USAGE
    assert "pass -c FILE" in capsys.readouterr().err


def test_config_path_from_environment(
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REPMGR_VIP_CONFIG", str(write_config()))
    assert main(["config"]) == ExitCode.OK
    assert 'address = "192.0.2.115/24"' in capsys.readouterr().out


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for code in ("0  done", "1  an operation failed", "2  usage", "3  refused for safety"):
        assert code in out
