"""Log shapes: journald (priority prefixes, no timestamp) and JSON lines."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import pytest

from repmgr_vip.adapters.log import LOG, setup_logging, setup_logging_for
from repmgr_vip.config.schema import load_config
from repmgr_vip.core.errors import ConfigError

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[tuple[Path, TextIO]]:
    """A file standing for stderr, as systemd connects it to the journal's stream socket."""
    path = tmp_path / "stderr"
    with path.open("w", encoding="utf-8") as stream:
        yield path, stream
    LOG.handlers.clear()


def _emit() -> None:
    LOG.debug("debugging")
    LOG.info("holding the VIP")
    LOG.warning("released the VIP")
    LOG.error("VIP CONFLICT")
    LOG.critical("on fire")
    for handler in LOG.handlers:
        handler.flush()


def test_journal_stream_gives_priorities_and_no_timestamp(
        stderr_file: tuple[Path, TextIO], monkeypatch: pytest.MonkeyPatch) -> None:
    path, stream = stderr_file
    st = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging(None, "pg-a", stream=stream)
    LOG.setLevel(logging.DEBUG)
    _emit()
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert not any(TIMESTAMP.search(line) for line in lines)
    assert "released the VIP" in lines[2]


def test_journal_stream_of_another_file_changes_nothing(
        stderr_file: tuple[Path, TextIO], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JOURNAL_STREAM inherited by a child whose stderr was redirected is not the journal."""
    path, stream = stderr_file
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging(None, "pg-a", stream=stream)
    _emit()
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert all(TIMESTAMP.match(line) and not line.startswith("<") for line in lines)


def test_json_lines_parse_and_carry_extra_fields(
        stderr_file: tuple[Path, TextIO], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, stream = stderr_file
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log_file = tmp_path / "repmgr-vip.log"
    setup_logging(log_file, "pg-b", log_format="json", stream=stream)
    _emit()
    LOG.warning("added the VIP: %s", "primary", extra={"action": "acquire", "peers": 2})
    try:
        raise OSError("boom")
    except OSError:
        LOG.exception("failed")
    for handler in LOG.handlers:
        handler.flush()
    for written in (log_file, path):
        records = [json.loads(line) for line in written.read_text().splitlines()]
        assert len(records) == 6
        assert all({"time", "level", "node", "message"} <= set(r) for r in records)
        assert all(r["node"] == "pg-b" for r in records)
        assert [r["level"] for r in records][:4] == ["info", "warning", "error", "critical"]
        assert records[4]["message"] == "added the VIP: primary"
        assert (records[4]["action"], records[4]["peers"]) == ("acquire", 2)
        assert "OSError: boom" in records[5]["exception"]


def test_json_on_the_journal_keeps_priorities(
        stderr_file: tuple[Path, TextIO], monkeypatch: pytest.MonkeyPatch) -> None:
    path, stream = stderr_file
    st = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging(None, "pg-a", log_format="json", stream=stream)
    _emit()
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["level"] for line in lines][1] == "warning"


def test_log_format_key(write_config: Callable[..., Path], stderr_file: tuple[Path, TextIO],
                        tmp_path: Path) -> None:
    assert load_config(write_config()).values[""]["log_format"] == "text"
    config = load_config(write_config(extra=f'log_format = "json"\nlog_file = "{tmp_path}/l"'))
    setup_logging_for(config, stream=stderr_file[1])
    LOG.info("hello")
    for handler in LOG.handlers:
        handler.flush()
    assert json.loads((tmp_path / "l").read_text())["message"] == "hello"
    with pytest.raises(ConfigError, match="log_format") as raised:
        load_config(write_config(extra='log_format = "xml"'))
    assert raised.value.exit_code == 2
