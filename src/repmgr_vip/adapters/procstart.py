"""When this process started: the standard library only, for the quick hook too."""

from __future__ import annotations

import os
import time


def process_start_time() -> float | None:
    """When this process started, on the wall clock (the kernel's ticks: 10 ms steps); what
    the journal's "hook_ms" counts from, so the interpreter's own start-up is included."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks)
