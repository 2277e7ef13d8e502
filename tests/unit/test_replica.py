"""[replica_vip]: config validation and which standby is eligible to hold it."""

from __future__ import annotations

from pathlib import Path

import pytest

from repmgr_vip.app.replica import Replication, eligible, should_hold
from repmgr_vip.cli.main import main
from repmgr_vip.config.schema import ReplicaSettings, load_config
from repmgr_vip.core.errors import ExitCode
from repmgr_vip.core.model import NodeRecord


def _write(tmp_path: Path, repmgr_conf: Path, replica: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'repmgr_config = "{repmgr_conf}"\n\n[vip]\naddress = "192.0.2.115/24"\n'
                    f'interface = "lo"\n\n[replica_vip]\n{replica}\n')
    return path


def test_replica_vip_is_optional_and_parsed(tmp_path: Path, repmgr_conf: Path) -> None:
    assert load_config(_write(tmp_path, repmgr_conf, "")).replica is None
    config = load_config(_write(tmp_path, repmgr_conf, 'address = ["192.0.2.116/24", '
                                '"2001:db8::116/64"]\nprefer = ["pg-c"]\nmax_lag_bytes = 10'))
    assert config.replica is not None
    assert config.replica.vip.cidr == "192.0.2.116/24, 2001:db8::116/64"
    assert config.replica.vip.interface == "lo"
    assert config.replica.prefer == ("pg-c",)


@pytest.mark.parametrize("replica", [
    'address = "192.0.2.115/24"',  # the primary VIP's own address
    'address = "2001:db8::116"',  # IPv6 without prefix
    'address = "192.0.2.116/24"\non_no_standby = "any"',
    'address = "192.0.2.116/24"\nprefer = "pg-c"',
    'address = "192.0.2.116/24"\nprefer = [1]',
    'address = "192.0.2.116/24"\nmax_lag_bytes = -1',
], ids=["same as vip", "no prefix", "bad on_no_standby", "prefer not a list",
        "prefer not names", "negative lag"])
def test_bad_replica_input_exits_2(tmp_path: Path, repmgr_conf: Path, replica: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(_write(tmp_path, repmgr_conf, replica)), "config"]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "replica_vip." in err, err


def _settings(tmp_path: Path, repmgr_conf: Path, extra: str = "") -> ReplicaSettings:
    config = load_config(_write(tmp_path, repmgr_conf,
                                f'address = "192.0.2.116/24"\nmax_lag_bytes = 100\n{extra}'))
    assert config.replica is not None
    return config.replica


ROWS = [Replication("n2", "streaming", 0), Replication("n3", "streaming", 50),
        Replication("n4", "catchup", 0), Replication("n5", "streaming", 500)]


def test_eligible_standbys_in_order(tmp_path: Path, repmgr_conf: Path) -> None:
    settings = _settings(tmp_path, repmgr_conf)
    standbys = ["n2", "n3", "n4", "n5"]
    assert eligible(settings, standbys, ROWS) == ["n2", "n3"]  # n4 not streaming, n5 lags
    preferring = _settings(tmp_path, repmgr_conf, 'prefer = ["n3"]')
    assert eligible(preferring, standbys, ROWS) == ["n3", "n2"]
    assert eligible(settings, ["n3"], ROWS) == ["n3"]  # n2 not a registered standby


def test_who_holds_it(tmp_path: Path, repmgr_conf: Path) -> None:
    settings = _settings(tmp_path, repmgr_conf)
    standbys = ["n2", "n3", "n5"]
    assert should_hold(settings, "n2", "n1", standbys, ROWS, holds=False)
    assert not should_hold(settings, "n3", "n1", standbys, ROWS, holds=False)
    assert should_hold(settings, "n3", "n1", standbys, ROWS, holds=True)  # keeps it: no flap
    assert not should_hold(settings, "n5", "n1", standbys, ROWS, holds=True)  # lags: gives up
    assert not should_hold(settings, "n1", "n1", standbys, ROWS, holds=False)  # the primary
    none_ok = [Replication("n2", "streaming", 999)]
    assert not should_hold(settings, "n1", "n1", standbys, none_ok, holds=False)
    on_primary = _settings(tmp_path, repmgr_conf, 'on_no_standby = "primary"')
    assert should_hold(on_primary, "n1", "n1", standbys, none_ok, holds=False)
    assert not should_hold(on_primary, "n1", "n1", standbys, ROWS, holds=True)


def test_prefer_must_name_registered_nodes(tmp_path: Path, repmgr_conf: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from repmgr_vip.adapters import cluster
    from repmgr_vip.app import replica
    from repmgr_vip.core.errors import ConfigError

    config = load_config(_write(tmp_path, repmgr_conf,
                                'address = "192.0.2.116/24"\nprefer = ["pg-c", "pg-x"]'))
    records = [NodeRecord(i, name, "standby", True, f"host=192.0.2.{i}", 1)
               for i, name in ((2, "pg-b"), (3, "pg-c"))]
    monkeypatch.setattr(cluster, "registered_nodes", lambda config, timeout=3.0: records)
    with pytest.raises(ConfigError, match=r"replica_vip\.prefer") as caught:
        replica.check_prefer(config)
    assert caught.value.exit_code == ExitCode.USAGE
    records.append(NodeRecord(4, "pg-x", "standby", True, "host=192.0.2.4", 1))
    replica.check_prefer(config)  # all registered: no error


def test_sudoers_lists_the_replica_vip(tmp_path: Path, repmgr_conf: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, repmgr_conf, 'address = "192.0.2.116/24"')
    assert main(["-c", str(path), "sudoers"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "address del 192.0.2.116/24 dev lo" in out
    assert "address del 192.0.2.115/24 dev lo" in out
    # the stale-SYN helper is for the VIP a peer takes over ssh, not for the replica VIP
    assert "refuse-stale lo 192.0.2.115" in out and "refuse-stale lo 192.0.2.116" not in out
    assert "arp-prove lo 192.0.2.115" in out and "arp-prove lo 192.0.2.116" not in out
