"""Logging for hooks: repmgr throws away or truncates a hook's output, so we keep our own file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from repmgr_vip.statefiles import open_append

LOG = logging.getLogger("repmgr_vip")


def setup_logging(log_file: Path | None, node_name: str, *, to_stderr: bool = True) -> None:
    """Log lines carry a timestamp and the node name so that files from all nodes interleave."""
    fmt = logging.Formatter(
        f"%(asctime)s.%(msecs)03d [{node_name}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
    )
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
            handler.setFormatter(fmt)
            LOG.addHandler(handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        LOG.addHandler(stream)
