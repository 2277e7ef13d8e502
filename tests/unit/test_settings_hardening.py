"""Settings that used to slip through: non-finite floats, out-of-range numbers, non-ASCII
digits, several words for one env value, control characters, malformed local conninfo."""

from __future__ import annotations

import math
import os
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repmgr_vip.cli.main import main
from repmgr_vip.config.repmgrconf import parse_repmgr_conf_text
from repmgr_vip.config.schema import SCHEMA, render_toml
from repmgr_vip.core.errors import ExitCode

FLOAT_KEYS = [(section, key) for section, keys in SCHEMA.items() for key, (kind, _) in
              keys.items() if kind is float]


def _config_with(write_config: Callable[..., Path], section: str, line: str) -> Path:
    path = write_config()
    path.write_text(path.read_text() + f"\n[{section}]\n{line}\n" if section != "vip"
                    else path.read_text() + f"{line}\n")
    return path


def _exit_2_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS, ids=[f"{s}.{k}" for s, k in FLOAT_KEYS])
def test_non_finite_floats_are_refused(section: str, key: str, literal: str,
                                       write_config: Callable[..., Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _config_with(write_config, section, f"{key} = {literal}")
    assert f"{section}.{key}" in _exit_2_one_line(capsys, ["-c", str(path), "config"])


@pytest.mark.parametrize(("section", "line"), [
    ("daemon", "metrics_port = 70000"), ("daemon", "metrics_port = -1"),
    ("fencing", "ssh_connect_timeout = 100000000000000000000"),
    ("vip", "announce_count = 1000000000"), ("vip", "probe_timeout = 1e300"),
])
def test_numbers_out_of_range_are_refused(section: str, line: str,
                                          write_config: Callable[..., Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _config_with(write_config, section, line)
    _exit_2_one_line(capsys, ["-c", str(path), "config"])


@pytest.mark.parametrize("prefix", ["\u00b2", "\u0663", "\uff12\uff14", " 24", "24\n"])
def test_prefix_length_takes_ascii_digits_only(prefix: str, write_config: Callable[..., Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(address=f"192.0.2.115/{prefix}".replace("\n", "\\n"))
    _exit_2_one_line(capsys, ["-c", str(path), "config"])


def test_sudoers_survives_no_nan(write_config: Callable[..., Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _config_with(write_config, "vip", "probe_timeout = nan")
    _exit_2_one_line(capsys, ["-c", str(path), "sudoers"])


@pytest.mark.parametrize("body", [
    "VIP=192.0.2.115/24\nINTERFACE=eth0 eth1\nREPMGR_DIR=/etc/repmgr\n",
    "VIP=192.0.2.115/24\nINTERFACE=eth0\nREPMGR_DIR=/etc/rep mgr\n",
    "VIP=192.0.2.115/24\nINTERFACE='eth0\x01'\nREPMGR_DIR=/etc/repmgr\n",
    "VIP=192.0.2.115/24\nINTERFACE=eth0\nREPMGR_DIR='/etc/repmgr\x1b[2J'\n",
    "VIP=192.0.2.115/24\nINTERFACE='eth0;x'\nREPMGR_DIR=/etc/repmgr\n",
])
def test_init_refuses_what_it_cannot_write_faithfully(body: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / ".repmgr_env"
    env.write_text(body)
    out = tmp_path / "out.toml"
    _exit_2_one_line(capsys, ["init", "--from-env", str(env), "-o", str(out)])
    assert not out.exists()


_SCALARS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",))),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_KEYS = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(top=st.dictionaries(_KEYS, _SCALARS, max_size=4),
       sections=st.dictionaries(_KEYS, st.dictionaries(_KEYS, _SCALARS, max_size=4),
                                max_size=3))
def test_render_toml_always_reads_back_the_same(top: dict[str, Any],
                                                 sections: dict[str, dict[str, Any]]) -> None:
    sections = {name: keys for name, keys in sections.items() if name not in top}
    values: dict[str, dict[str, Any]] = {"": top, **sections}
    again = tomllib.loads(render_toml(values))
    expected = {**top, **{name: keys for name, keys in sections.items() if keys}}
    assert _same(again, expected)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and bool(a == b)


@pytest.mark.parametrize("conninfo", [
    "host=192.0.2.12 port=99999 user=repmgr",
    "postgresql://repmgr@192.0.2.12:99999/repmgr",
    "postgresql://repmgr@[192.0.2.12/repmgr",
    "host=[192.0.2.12 user=repmgr",
    "host=''192.0.2.12 user=repmgr",
    "host=192.0.2.12 user",
])
def test_malformed_local_conninfo_exits_2_without_traceback(
        conninfo: str, repmgr_conf: Path, write_config: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    text = repmgr_conf.read_text()
    start = text.index("conninfo=")
    end = text.index("\n", start)
    repmgr_conf.write_text(text[:start] + f"conninfo='{conninfo}'" + text[end:])
    for command in ("config", "repmgr-conf", "release"):
        _exit_2_one_line(capsys, ["-c", str(write_config()), command])


def test_hook_lines_carry_an_absolute_config_path(write_config: Callable[..., Path],
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config()
    monkeypatch.chdir(path.parent)
    assert main(["-c", path.name, "repmgr-conf"]) == 0
    values = parse_repmgr_conf_text(capsys.readouterr().out)
    words = shlex.split(values["promote_command"])
    assert words[1] == "-c" and os.path.isabs(words[2]) and Path(words[2]) == path
