"""Logging: our own file (repmgr throws away or truncates a hook's output), plus stderr.

Three shapes: "text" lines with a timestamp and the node name, so files from all nodes
interleave; the same without a timestamp and with a syslog priority prefix (`<4>`) when
stderr is the journal, so `journalctl -p warning` filters and journald's own timestamps are
not doubled; and "json" (`log_format = "json"`), one object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from repmgr_vip.config.schema import Config

from repmgr_vip.adapters.statefiles import open_append

LOG = logging.getLogger("repmgr_vip")
LOG_FORMATS = ("text", "json")

# Python level -> syslog priority (sd-daemon(3) prefixes that journald strips and stores).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
# What every LogRecord carries; anything else came from `extra=` and goes into JSON lines.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def stderr_is_journal(stream: TextIO) -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino of the stream it connected; compare with ours."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, node, message and any `extra=` fields."""

    def __init__(self, node_name: str) -> None:
        super().__init__()
        self.node_name = node_name

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": self.node_name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in data:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """`<priority>` prefix, no timestamp: journald adds its own, and -p filters on ours."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def _formatters(node_name: str, log_format: str, stream: TextIO
                ) -> tuple[logging.Formatter, logging.Formatter]:
    """(for files, for stderr)."""
    if log_format == "json":
        json_fmt = JsonFormatter(node_name)
        return json_fmt, (JournalFormatter(json_fmt) if stderr_is_journal(stream) else json_fmt)
    stamped = logging.Formatter(
        f"%(asctime)s.%(msecs)03d [{node_name}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
    )
    if stderr_is_journal(stream):
        return stamped, JournalFormatter(
            logging.Formatter(f"[{node_name}] %(levelname)s %(message)s"))
    return stamped, stamped


def setup_logging(log_file: Path | None, node_name: str, *, to_stderr: bool = True,
                  log_format: str = "text", stream: TextIO | None = None) -> None:
    """Log lines carry the node name so that files from all nodes interleave."""
    stream = stream or sys.stderr
    file_fmt, stderr_fmt = _formatters(node_name, log_format, stream)
    LOG.handlers.clear()
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    if log_file is not None:
        try:
            handler: logging.Handler = logging.StreamHandler(open_append(log_file))
        except OSError as exc:
            print(f"repmgr-vip: cannot write log file {log_file} ({exc.strerror})",
                  file=sys.stderr)
        else:
            handler.setFormatter(file_fmt)
            LOG.addHandler(handler)
    if to_stderr:
        to_stream = logging.StreamHandler(stream)
        to_stream.setFormatter(stderr_fmt)
        LOG.addHandler(to_stream)


def log_format_of(config: Config) -> str:
    return str(config.values.get("", {}).get("log_format", "text"))


def setup_logging_for(config: Config, stream: TextIO | None = None) -> None:
    """The hooks' and the daemon's logging, from the configuration (also after a reload)."""
    setup_logging(config.log_file, config.repmgr.node_name, log_format=log_format_of(config),
                  stream=stream)
