"""The Debian package: built with Debian's tooling, installed with apt, purged without a trace.

Needs root, dpkg-buildpackage and apt (a Debian 12 machine after `make setup`). RV_DEB names a
.deb already built (`make test` passes the one it installed); otherwise one is built here.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from repmgr_vip import __version__

ROOT = Path(__file__).resolve().parents[2]
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]
ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
UNIT = Path("/lib/systemd/system/repmgr-vip.service")


def _required() -> bool:
    return os.environ.get("RVLAB_REQUIRE") == "1" or os.environ.get("CI") == "true"


def _missing() -> list[str]:
    missing = [tool for tool in ("dpkg-buildpackage", "apt-get", "lintian", "man")
               if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing()
    if missing:
        message = "package tests need: " + ", ".join(missing) + " (run `make setup` as root)"
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    given = os.environ.get("RV_DEB")
    if given:
        return Path(given).resolve()
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(["make", "-C", str(ROOT), "deb", f"DIST={dist}"], check=True,
                   capture_output=True, text=True)
    return dist / f"repmgr-vip_{__version__}_all.deb"


def _installed() -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "repmgr-vip"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() == "installed"


def _install(deb: Path) -> None:
    result = subprocess.run([*APT, "install", "--reinstall", str(deb)], env=ENV,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(deb: Path) -> Path:
    _install(deb)
    return deb


def test_lintian_reports_no_errors(deb: Path) -> None:
    result = subprocess.run(["lintian", "--pedantic", str(deb)], capture_output=True, text=True,
                            check=False)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert not errors, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_command_is_the_package(installed: Path) -> None:
    owner = subprocess.run(["dpkg", "-S", "/usr/bin/repmgr-vip"], capture_output=True,
                           text=True, check=True)
    assert owner.stdout.startswith("repmgr-vip:")
    version = subprocess.run(["/usr/bin/repmgr-vip", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.split() == ["repmgr-vip", __version__]
    # Debian's own libraries, not a venv's: the package's Depends are what it runs on.
    probe = subprocess.run(["/usr/bin/python3", "-c",
                            "import psycopg, prometheus_client, repmgr_vip;"
                            "print(psycopg.__file__, prometheus_client.__file__,"
                            " repmgr_vip.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/")
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in probe.stdout.split())


def test_man_page_lists_every_subcommand(installed: Path) -> None:
    page = Path("/usr/share/man/man8/repmgr-vip.8.gz")
    roff = gzip.decompress(page.read_bytes()).decode()
    assert roff.startswith(".TH REPMGR\\-VIP 8")
    shown = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True,
                           text=True, check=True, env={**ENV, "MANWIDTH": "100"}).stdout
    from repmgr_vip.cli.main import build_parser
    from repmgr_vip.cli.manpage import _subcommands

    for name, _help, _sub in _subcommands(build_parser()):
        assert f"repmgr-vip {name}" in shown, name
    assert "EXIT STATUS" in shown and "SIGHUP" in shown


def test_unit_is_installed_not_enabled_and_runs_the_package(installed: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/repmgr-vip daemon" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "/opt/" not in text
    wanted = Path("/etc/systemd/system/multi-user.target.wants/repmgr-vip.service")
    assert not wanted.exists() and not wanted.is_symlink()
    if shutil.which("systemd-analyze"):  # the systemd package; not in every container
        verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                                text=True, check=False)
        problems = [line for line in verify.stderr.splitlines() if "repmgr-vip.service" in line]
        assert not problems, verify.stderr
    example = Path("/usr/share/doc/repmgr-vip/examples/repmgrd.service")
    assert example.exists() and not Path("/lib/systemd/system/repmgrd.service").exists()


def test_example_config_is_valid(installed: Path, tmp_path: Path) -> None:
    example = Path("/usr/share/doc/repmgr-vip/examples/repmgr-vip.toml")
    raw = tomllib.loads(example.read_text())
    assert raw["repmgr_config"] == "/etc/repmgr.conf"
    datadir = tmp_path / "main"
    datadir.mkdir()
    repmgr_conf = tmp_path / "repmgr.conf"
    repmgr_conf.write_text("node_id=1\nnode_name='pg-a'\n"
                           "conninfo='host=192.0.2.1 user=repmgr dbname=repmgr'\n"
                           f"data_directory='{datadir}'\n")
    config = tmp_path / "repmgr-vip.toml"
    config.write_text(example.read_text()
                      .replace('"/etc/repmgr.conf"', f'"{repmgr_conf}"')
                      .replace('interface = "eth0"', 'interface = "lo"'))
    result = subprocess.run(["/usr/bin/repmgr-vip", "-c", str(config), "config"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _owned_elsewhere(path: str) -> bool:
    result = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, check=False)
    owners = {o.strip() for line in result.stdout.splitlines()
              for o in line.rsplit(":", 1)[0].split(",")}
    return bool(owners - {"repmgr-vip"})


@pytest.fixture
def reinstall_after(deb: Path) -> Iterator[None]:
    """The lab suite may run the package after this test: put it back as it was."""
    was_installed = _installed()
    yield
    if was_installed and not _installed():
        _install(deb)


def test_purge_leaves_nothing_behind(installed: Path, reinstall_after: None) -> None:
    listed = subprocess.run(["dpkg", "-L", "repmgr-vip"], capture_output=True, text=True,
                            check=True).stdout.split()
    ours = [p for p in listed if p != "/." and not _owned_elsewhere(p)]
    # What maintainer scripts create besides the listed files: byte code, systemd state.
    extra = ["/usr/lib/python3/dist-packages/repmgr_vip/__pycache__",
             "/var/lib/systemd/deb-systemd-helper-enabled/repmgr-vip.service.dsh-also"]
    assert Path("/usr/lib/python3/dist-packages/repmgr_vip/__pycache__").is_dir()
    result = subprocess.run([*APT, "purge", "repmgr-vip"], env=ENV, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    left = [p for p in [*ours, *extra] if os.path.lexists(p)]
    assert not left, left
    status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "repmgr-vip"],
                            capture_output=True, text=True, check=False)
    assert status.stdout.strip() in ("", "not-installed")
